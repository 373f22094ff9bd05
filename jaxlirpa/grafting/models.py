"""The paper's architectures as flax modules, each ReLU a :class:`GraftedReLU`.

Inputs are NHWC (``(N, 28, 28, 1)`` MNIST, ``(N, 32, 32, 3)`` CIFAR-10); input
normalisation is left to the caller. flax infers input channels and Dense fan-in,
so one module serves both datasets; the shapes below are those of the original
PyTorch definitions (ERAN / CROWN repositories for ConvBig, alpha-beta-CROWN's
``model_defs.py`` for CNN-B and ResNet-4B), which were checked against their
source. Flattening is NHWC, not PyTorch's NCHW: weights trained there need a
transpose, models trained here do not. Every activation starts with an all-zero
mask: a freshly initialised model is a plain ReLU network.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxlirpa.grafting.activation import GraftedReLU


def _conv(features: int, kernel: int, stride: int, pad: int, name: str) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)), name=name)


class ConvStack(nn.Module):
    """Convolutions, then dense layers, a :class:`GraftedReLU` after each but the last.

    **Arguments:**
    - ``convs``: ``(features, kernel, stride, padding)`` per convolution.
    - ``dense``: widths of the dense layers, the last one the number of classes.
    - ``input_padding``: ``((top, bottom), (left, right))`` zeros around the image first.

    Activations are named ``relu1``, ``relu2``, ... in order.
    Example: ``ConvStack(convs=((16, 4, 2, 1),), dense=(100, 10))``.
    """

    convs: Sequence[tuple[int, int, int, int]]
    dense: Sequence[int]
    input_padding: tuple | None = None

    @nn.compact
    def __call__(self, x):
        if self.input_padding is not None:
            x = jnp.pad(x, ((0, 0), *self.input_padding, (0, 0)))
        k = 0
        for k, (features, kernel, stride, pad) in enumerate(self.convs, 1):
            x = GraftedReLU(name=f"relu{k}")(_conv(features, kernel, stride, pad, f"conv{k}")(x))
        x = x.reshape(x.shape[0], -1)
        for j, width in enumerate(self.dense, 1):
            x = nn.Dense(width, name=f"dense{j}")(x)
            if j < len(self.dense):
                x = GraftedReLU(name=f"relu{k + j}")(x)
        return x


class CNNA(ConvStack):
    """CNN-A (alpha-beta-CROWN's ``mnist_cnn_4layer``): Conv(16, 4x4, s2, p1) -
    Conv(32, 4x4, s2, p1) - Dense(100) - Dense(10). 4804 ReLUs on MNIST
    (14x14x16, 7x7x32, 100). Example: ``CNNA().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))``."""

    convs: Sequence[tuple[int, int, int, int]] = ((16, 4, 2, 1), (32, 4, 2, 1))
    dense: Sequence[int] = (100, 10)


class ConvBig(ConvStack):
    """ConvBig (ERAN's ``convBigRELU``, CROWN's ``mnist_conv_big`` / ``cifar_conv_big``):
    Conv(32, 3x3, s1, p1) - Conv(32, 4x4, s2, p1) - Conv(64, 3x3, s1, p1) -
    Conv(64, 4x4, s2, p1) - Dense(512) - Dense(512) - Dense(10).
    MNIST: 28x28x32, 14x14x32, 14x14x64, 7x7x64 feature maps (Dense fan-in 3136,
    48064 ReLUs); CIFAR: 32x32x32, 16x16x32, 16x16x64, 8x8x64 (fan-in 4096, 62464 ReLUs).
    Example: ``ConvBig().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))``."""

    convs: Sequence[tuple[int, int, int, int]] = ((32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1))
    dense: Sequence[int] = (512, 512, 10)


class ConvHuge(ConvStack):
    """ConvHuge (DiffAI's ``convHuge``, the origin of ConvBig too): Conv(128, 3x3, s1, p1) -
    Conv(128, 4x4, s1, p1) - Conv(256, 3x3, s1, p1) - Conv(256, 4x4, s1, p1) - Dense(512) -
    Dense(512) - Dense(10); no stride, so the maps stay large. CIFAR: 32x32x128, 31x31x128,
    31x31x256, 30x30x256 (Dense fan-in 230400, 731520 ReLUs); MNIST: 28, 27, 27, 26 wide.
    Example: ``ConvHuge().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))``."""

    convs: Sequence[tuple[int, int, int, int]] = ((128, 3, 1, 1), (128, 4, 1, 1), (256, 3, 1, 1), (256, 4, 1, 1))
    dense: Sequence[int] = (512, 512, 10)


class CNNB(ConvStack):
    """CNN-B (alpha-beta-CROWN's ``cnn_4layer_b``): zero padding (top 1, bottom 2,
    left 1, right 2: the original's ``ZeroPad2d((1, 2, 1, 2))``) - Conv(32, 5x5, s2, p0) -
    Conv(128, 4x4, s2, p1) - Dense(250) - Dense(10). CIFAR: 16x16x32, 8x8x128
    (fan-in 8192, as the original); MNIST: 14x14x32, 7x7x128 (fan-in 6272).
    Example: ``CNNB().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))``."""

    convs: Sequence[tuple[int, int, int, int]] = ((32, 5, 2, 0), (128, 4, 2, 1))
    dense: Sequence[int] = (250, 10)
    input_padding: tuple | None = ((1, 2), (1, 2))


class BasicBlock(nn.Module):
    """``relu(conv3x3(relu(conv3x3_s(x))) + shortcut(x))``, without batch norm;
    the shortcut is a 1x1 convolution of stride ``s`` when the shape changes.
    Example: ``BasicBlock(32, stride=2)`` halves the feature map and outputs 32 channels."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        y = GraftedReLU(name="relu1")(_conv(self.features, 3, self.stride, 1, "conv1")(x))
        y = _conv(self.features, 3, 1, 1, "conv2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=self.stride, padding="VALID", name="shortcut")(x)
        return GraftedReLU(name="relu2")(y + x)


class ResNet4B(nn.Module):
    """ResNet-4B (alpha-beta-CROWN's ``resnet4b`` = ``CResNet7(BasicBlock, num_blocks=2,
    in_planes=16, bn=False, last_layer="dense")``), for CIFAR-10 (32x32x3):

    conv 16 3x3 s2 p1 (16x16x16) - ReLU - 2 blocks of 32 channels, the first of
    stride 2 (8x8x32) - 2 blocks of 32 channels, the first of stride 2 (4x4x32) -
    Dense(100) - ReLU - Dense(10). Four residual blocks, ten ReLU layers (14436 neurons).
    Example: ``ResNet4B().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))``.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = GraftedReLU(name="relu")(_conv(16, 3, 2, 1, "conv")(x))
        for k, stride in enumerate((2, 1, 2, 1), 1):
            x = BasicBlock(32, stride, name=f"block{k}")(x)
        x = GraftedReLU(name="dense_relu")(nn.Dense(100, name="dense1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="dense2")(x)

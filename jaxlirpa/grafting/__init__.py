"""Linearity grafting (Chen, Zhang et al., ICML 2022): replace the unstable and
insignificant ReLU neurons of a network by learnable lines, so that it becomes
easier to verify while staying accurate.

The pipeline: train with FAT (:func:`fat_train`), score the neurons
(:func:`unstable_scores`, :func:`significance_scores`), select a global fraction
(:func:`select_neurons`), set the masks of the :class:`GraftedReLU` layers
(:func:`with_masks`), fine-tune (:func:`finetune`, or all of it in rounds with
:func:`graft`), and evaluate (:func:`report`). See ``examples/grafting_mnist.py``.
"""
from jaxlirpa.grafting.activation import GraftedReLU, get_masks, with_masks
from jaxlirpa.grafting.fat import fat_loss, fat_train, grad_align_penalty, make_fat_step
from jaxlirpa.grafting.finetune import finetune, finetune_optimizer, graft
from jaxlirpa.grafting.models import CNNA, CNNB, BasicBlock, ConvBig, ConvHuge, ConvStack, ResNet4B
from jaxlirpa.grafting.reporting import GraftingReport, ModelReport, report
from jaxlirpa.grafting.scores import (activations, preactivation_bounds, preactivations, significance_scores,
                                      unstable_neurons, unstable_scores)
from jaxlirpa.grafting.selection import gamma_schedule, grafting_priority, random_priority, select_neurons
from jaxlirpa.grafting.verifiers import complete_verifier, incomplete_verifier

__all__ = [
    "BasicBlock", "CNNA", "CNNB", "ConvBig", "ConvHuge", "ConvStack", "GraftedReLU", "GraftingReport", "ModelReport",
    "ResNet4B", "activations", "complete_verifier", "fat_loss", "fat_train", "finetune", "finetune_optimizer",
    "gamma_schedule", "get_masks", "grad_align_penalty", "graft", "grafting_priority", "incomplete_verifier",
    "make_fat_step", "preactivation_bounds", "preactivations", "random_priority", "report", "select_neurons",
    "significance_scores", "unstable_neurons", "unstable_scores", "with_masks",
]

"""Bound a transformer encoder end to end: an L-inf ball around every token embedding.

1. Generate a sentiment-like task in code: sequences of ``--length`` words from a
   vocabulary of 16; words 0-4 are positive, 5-9 negative, 10-15 neutral, and the
   label says whether positive words outnumber negative ones (ties are redrawn).
2. Train a small flax transformer encoder (token and position embeddings, pre-norm
   blocks of ``nn.LayerNorm``, multi-head self-attention with ``jax.nn.softmax`` and a
   gelu MLP, mean pooling, a dense head) with optax Adam for a few epochs.
3. Bound the classification margin of the first ``--n-test`` test sequences over
   every embedding matrix within L-inf distance ``--eps`` of the clean one, with IBP,
   CROWN-IBP and CROWN. The function bounded maps embeddings to logits
   (``Encoder.classify``): tokens are discrete, their embeddings are what moves.
   jaxlirpa bounds ``Q K^T`` and ``attention @ V`` with McCormick planes, softmax,
   layer norm and gelu with their dedicated relaxations.

Per method it prints the verified accuracy (correct and margin provably positive),
the mean margin lower bound, and the time to bound all sequences, first (tracing
and XLA compilation included) and again (compiled). IBP's intervals blow up at every
layer norm (the variance of a box can reach 0); CROWN-IBP keeps IBP's intervals for
every intermediate bound, CROWN replaces them by back-substitution, which is what
lets it verify at radii where the other two cannot.

    python examples/transformer.py                   # 8 words, dim 16, 1 block, eps 0.003
    python examples/transformer.py --ci              # tiny: about 20 s
    python examples/transformer.py --depth 2 --eps 0.002
"""
from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxlirpa
from quickstart import timed, train  # its Adam training loop and timer (examples/ is on the path)

METHODS = ["ibp", "crown-ibp", "crown"]  # loosest to tightest
VOCAB, POSITIVE, NEGATIVE = 16, range(0, 5), range(5, 10)
CI = ["--length", "4", "--dim", "8", "--train", "1000", "--epochs", "5", "--n-test", "10"]


class Block(nn.Module):
    """Pre-norm encoder block: ``h + attention(norm(h))``, then ``h + mlp(norm(h))``."""

    dim: int
    heads: int

    @nn.compact
    def __call__(self, h):
        batch, length, _ = h.shape
        split = lambda t: t.reshape(batch, length, self.heads, self.dim // self.heads)  # noqa: E731
        z = nn.LayerNorm()(h)
        q, k, v = (split(nn.Dense(self.dim, name=name)(z)) for name in ("query", "key", "value"))
        scores = jnp.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(self.dim // self.heads)
        attention = jax.nn.softmax(scores, axis=-1)
        mixed = jnp.einsum("bhlm,bmhd->blhd", attention, v).reshape(batch, length, self.dim)
        h = h + nn.Dense(self.dim, name="attention_out")(mixed)
        z = nn.gelu(nn.Dense(2 * self.dim)(nn.LayerNorm()(h)))
        return h + nn.Dense(self.dim)(z)


class Encoder(nn.Module):
    """Tokens ``(batch, length)`` -> logits; ``embed`` and ``classify`` are its two halves."""

    length: int
    dim: int = 16
    heads: int = 2
    depth: int = 1
    classes: int = 2

    def setup(self):
        self.tokens = nn.Embed(VOCAB, self.dim)
        self.positions = self.param("positions", nn.initializers.normal(0.02), (self.length, self.dim))
        self.blocks = [Block(self.dim, self.heads) for _ in range(self.depth)]
        self.head = nn.Dense(self.classes)

    def embed(self, tokens):
        return self.tokens(tokens) + self.positions

    def classify(self, embeddings):
        h = embeddings
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(axis=1))

    def __call__(self, tokens):
        return self.classify(self.embed(tokens))


def make_task(n: int, length: int, seed: int):
    """``n`` random word sequences and whether positive words outnumber negative ones."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (4 * n, length))
    score = np.isin(tokens, POSITIVE).sum(1) - np.isin(tokens, NEGATIVE).sum(1)
    keep = np.flatnonzero(score != 0)[:n]  # no ties
    return tokens[keep].astype(np.int32), (score[keep] > 0).astype(np.int32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=8, help="words per sequence (default: 8)")
    p.add_argument("--dim", type=int, default=16, help="embedding width (default: 16)")
    p.add_argument("--heads", type=int, default=2, help="attention heads (default: 2)")
    p.add_argument("--depth", type=int, default=1, help="encoder blocks (default: 1)")
    p.add_argument("--train", type=int, default=4000, help="training sequences (default: 4000)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (default: 5)")
    p.add_argument("--eps", type=float, default=0.003, help="L-inf radius around each embedding (default: 0.003)")
    p.add_argument("--n-test", type=int, default=100, help="test sequences to verify (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, init and shuffling (default: 0)")
    p.add_argument("--ci", action="store_true", help="tiny setting for CI: " + " ".join(CI))
    argv = sys.argv[1:] if argv is None else list(argv)
    return p.parse_args(CI + argv if "--ci" in argv else argv)  # flags given after --ci win


def main(argv=None) -> dict:
    """Train, bound, print the table; returns the clean margins and each method's margin bounds."""
    args = parse_args(argv)
    tokens, labels = make_task(args.train + args.n_test, args.length, args.seed)
    x_train, y_train, x_test, y_test = tokens[:args.train], labels[:args.train], tokens[args.train:], labels[args.train:]
    print(f"task: {len(x_train)} train, {len(x_test)} test sequences of {args.length} words "
          f"({y_train.mean():.0%} positive)")

    model = Encoder(args.length, args.dim, args.heads, args.depth)
    t0 = time.perf_counter()
    params = train(model, x_train, y_train, args.epochs, args.seed, lr=3e-3)
    print(f"trained in {time.perf_counter() - t0:.1f} s")

    def classify(embeddings):  # the function bounded: embeddings (batch, length, dim) -> logits
        return model.apply(params, embeddings, method=Encoder.classify)

    embeddings = model.apply(params, jnp.asarray(x_test), method=Encoder.embed)
    y = jnp.asarray(y_test)
    spec = jaxlirpa.margin_spec(y, 2)  # one row: logit[y] - logit[other]
    clean_margins = np.asarray(jnp.einsum("bro,bo->br", spec, classify(embeddings)))
    correct = clean_margins[:, 0] > 0
    print(f"\nverifying {len(y)} test sequences at L-inf eps = {args.eps:g} on the embeddings "
          f"(clean accuracy {correct.mean():.2%})\n")

    header = f"{'method':<11} {'verified acc':>12} {'mean margin LB':>15} {'first (s)':>10} {'steady (s)':>10}"
    print(header)
    print("-" * len(header))
    results = {}
    for method in METHODS:
        run = lambda: jaxlirpa.bound(classify, embeddings, args.eps, method=method, spec=spec)  # noqa: E731
        _, t_first = timed(run)
        b, t_steady = timed(run)
        results[method] = (np.asarray(b.lower), np.asarray(b.upper))
        verified = np.all(results[method][0] > 0, axis=1) & correct
        print(f"{method:<11} {verified.mean():>12.2%} {results[method][0].mean():>15.4f} {t_first:>10.2f} "
              f"{t_steady:>10.2f}")
    return {"clean_margins": clean_margins, "bounds": results}


if __name__ == "__main__":
    main()

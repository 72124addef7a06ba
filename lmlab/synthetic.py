"""Synthetic corpora, generated offline from a seed, each made to show one mechanism (`--data synthetic:NAME`, or
`synthetic:NAME:SEED`), with the exact entropy rate of its source: the loss, in nats per character, of a predictor
that knows the process and the whole past.

- induction: a random run of distinct symbols, then the same run again, then another run and its copy, and so on,
  with nothing in between. The first symbol seen twice starts a copy; the rest of the copy is only predictable by
  looking back for the current symbol and reading what followed it there (an induction head).
- markov: a first-order Markov chain with a random transition table; the current symbol is all there is to know,
  so the best prediction needs no context at all (a bigram, visible in the logit lens of the embeddings).

A model sees windows of block_size tokens, not the whole past, so even a perfect one stays a little above the rate:
at the start of a window it has not seen the first copy of a segment, nor the symbol before.
"""

from __future__ import annotations

import bisect
import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .common import LmlabError, atomic_write_bytes, cache_dir

PREFIX = "synthetic:"
CHARS = 2_000_000  # characters generated per corpus (the last 10% become the validation split)
VERSION = 3  # part of the cached file's name: bump it when a generator changes

# induction: the symbols and the length of a run
INDUCTION_SYMBOLS = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"  # 64
INDUCTION_LENGTHS = (8, 40)  # a run has between 8 and 40 symbols, uniformly (both included)

# markov: alphabet and how peaked the rows of the transition table are
MARKOV_SYMBOLS = string.ascii_lowercase
MARKOV_CONCENTRATION = 0.3  # each row ~ Dirichlet(0.3, ..., 0.3): a few likely successors per symbol


@dataclass(frozen=True)
class Synthetic:
    description: str
    generate: Callable[[int, int], str]
    """(seed, characters) -> the text."""
    entropy_rate: Callable[[int], float]
    """seed -> nats per character of the source."""


# ---------------------------------------------------------------------------------------------------------------
# induction


def induction_text(seed: int, chars: int) -> str:
    rng = np.random.default_rng(seed)
    symbols = np.array(list(INDUCTION_SYMBOLS))
    lo, hi = INDUCTION_LENGTHS
    parts, size = [], 0
    while size < chars:
        run = "".join(symbols[rng.choice(len(symbols), size=int(rng.integers(lo, hi + 1)), replace=False)])
        parts.append(run + run)
        size += 2 * len(run)
    return "".join(parts)[:chars]


def induction_entropy_rate(seed: int = 0) -> float:
    """After j symbols of a run (j >= 1), the next is its first symbol again (the copy starts) with the hazard
    h_j = P(n = j | n >= j), else one of the A - j symbols not used yet, uniformly; a run's first symbol is any of
    the A, and the copy is certain. The rate is the expected entropy of a run and its copy over their expected
    length (renewal-reward)."""
    lo, hi = INDUCTION_LENGTHS
    count, p_length = len(INDUCTION_SYMBOLS), 1.0 / (hi - lo + 1)
    nats = math.log(count)  # j = 0
    for j in range(1, hi + 1):
        at_least = p_length * (hi - max(j, lo) + 1)  # P(n >= j)
        hazard = p_length / at_least if j >= lo else 0.0
        nats += at_least * (_binary_entropy(hazard) + (1 - hazard) * math.log(max(count - j, 1)))
    return nats / (lo + hi)  # the expected length of a run and its copy, 2 E[n]


def _binary_entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -(p * math.log(p) + (1 - p) * math.log(1 - p))


# ---------------------------------------------------------------------------------------------------------------
# markov


def markov_table(seed: int) -> np.ndarray:
    """The (A, A) transition table of the chain: row i is the distribution of the symbol after symbol i."""
    rng = np.random.default_rng(seed)
    count = len(MARKOV_SYMBOLS)
    return rng.dirichlet(np.full(count, MARKOV_CONCENTRATION), size=count)


def markov_stationary(table: np.ndarray) -> np.ndarray:
    """pi with pi @ table = pi: the left eigenvector of eigenvalue 1, normalised."""
    values, vectors = np.linalg.eig(table.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    return pi / pi.sum()


def markov_text(seed: int, chars: int) -> str:
    table = markov_table(seed)
    cumulative = [list(np.cumsum(row)) for row in table]
    uniforms = np.random.default_rng([seed, 1]).random(chars).tolist()
    state, out = 0, []
    for u in uniforms:
        row = cumulative[state]
        state = min(bisect.bisect_right(row, u * row[-1]), len(row) - 1)
        out.append(MARKOV_SYMBOLS[state])
    return "".join(out)


def markov_entropy_rate(seed: int) -> float:
    """sum_i pi_i H(row i): the entropy of the next symbol given the current one, averaged over the stationary
    distribution."""
    table = markov_table(seed)
    logs = np.log(np.where(table > 0, table, 1.0))
    return float(-(markov_stationary(table) * (table * logs).sum(1)).sum())


# ---------------------------------------------------------------------------------------------------------------
# The sources


SYNTHETIC: dict[str, Synthetic] = {
    "induction": Synthetic(
        f"runs of {INDUCTION_LENGTHS[0]}-{INDUCTION_LENGTHS[1]} distinct random symbols out of "
        f"{len(INDUCTION_SYMBOLS)}, each followed by its copy: learnt by induction heads", induction_text,
        induction_entropy_rate),
    "markov": Synthetic(
        f"a first-order Markov chain over {len(MARKOV_SYMBOLS)} letters with a random transition table: "
        f"context beyond the current symbol does not help", markov_text, markov_entropy_rate),
}


def is_synthetic(src: str) -> bool:
    return src.startswith(PREFIX)


def parse(src: str) -> tuple[str, int]:
    """synthetic:NAME or synthetic:NAME:SEED -> (NAME, SEED); the seed is 0 unless given."""
    name, _, seed = src[len(PREFIX):].partition(":")
    if name not in SYNTHETIC:
        raise LmlabError(f"unknown synthetic corpus {src!r}; choose from "
                         f"{', '.join(PREFIX + n for n in SYNTHETIC)} (optionally :SEED)")
    if seed and not (seed.isascii() and seed.isdigit() and len(seed) <= 18):
        raise LmlabError(f"the seed in {src!r} must be a non-negative whole number")
    return name, int(seed or 0)


def entropy_rate(src: str) -> float:
    """Nats per character of the source named by src."""
    name, seed = parse(src)
    return SYNTHETIC[name].entropy_rate(seed)


def corpus_file(src: str) -> Path:
    """The corpus's text in the cache, generated the first time it is asked for."""
    name, seed = parse(src)
    path = cache_dir() / "corpora" / f"synthetic-{name}-seed{seed}-v{VERSION}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, SYNTHETIC[name].generate(seed, CHARS).encode("ascii"))
    return path

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

- chat (`synthetic:chat`, `synthetic:chat:SEED`): not a text but conversations, for supervised fine-tuning: short
  tasks whose answers a function checks (SKILLS: arithmetic, copying, reversing, counting a letter, looking up a
  value given earlier in the conversation), a train and a held-out split that share no task, and `verify`, the
  checker that validation and a reward stage use. `chat_tasks` gives them as plain data.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence, Union

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


def is_chat(src: str) -> bool:
    """Whether src names the synthetic conversations (synthetic:chat, synthetic:chat:SEED)."""
    return is_synthetic(src) and src[len(PREFIX):].partition(":")[0] == CHAT


def parse(src: str) -> tuple[str, int]:
    """synthetic:NAME or synthetic:NAME:SEED -> (NAME, SEED); the seed is 0 unless given."""
    name, _, seed = src[len(PREFIX):].partition(":")
    if name not in SYNTHETIC and name != CHAT:
        raise LmlabError(f"unknown synthetic corpus {src!r}; choose from "
                         f"{', '.join(PREFIX + n for n in [*SYNTHETIC, CHAT])} (optionally :SEED)")
    if seed and not (seed.isascii() and seed.isdigit() and len(seed) <= 18):
        raise LmlabError(f"the seed in {src!r} must be a non-negative whole number")
    return name, int(seed or 0)


def _text(src: str) -> tuple[str, int]:
    """parse, for the text corpora only."""
    name, seed = parse(src)
    if name == CHAT:
        raise LmlabError(f"{src} is conversations, for supervised fine-tuning, not a text to pretrain on or to "
                         f"score")
    return name, seed


def entropy_rate(src: str) -> float:
    """Nats per character of the source named by src."""
    name, seed = _text(src)
    return SYNTHETIC[name].entropy_rate(seed)


def corpus_file(src: str) -> Path:
    """The corpus's text in the cache, generated the first time it is asked for."""
    name, seed = _text(src)
    path = cache_dir() / "corpora" / f"synthetic-{name}-seed{seed}-v{VERSION}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, SYNTHETIC[name].generate(seed, CHARS).encode("ascii"))
    return path


# ---------------------------------------------------------------------------------------------------------------
# chat: conversations whose answers a function checks


CHAT = "chat"
CHAT_DESCRIPTION = ("short conversations whose answers a function checks (arithmetic, copying, reversing, counting "
                    "a letter, looking up a value given earlier), for fine-tuning (--stage sft)")
CHAT_TRAIN, CHAT_HELDOUT = 20_000, 1_000  # conversations in each split
HELDOUT_SHARE = 10  # one task in 10, by a hash of its turns, is held out: the same task is never in both splits
CHAT_SYSTEM = ("You are a helpful assistant.", "Answer with the result only.", "Be brief.")
LOOKUP_KEYS = ("ant", "bat", "bee", "cat", "cow", "dog", "eel", "elk", "emu", "fox", "hen", "owl", "pig", "rat", "yak")
COUNT_LETTERS = "abcde"  # counting draws its words from a few letters, so a letter comes more than once


@dataclass(frozen=True)
class ChatTask:
    """One synthetic:chat conversation as a task: the prompt, its reference answer and the skill it tests."""

    skill: str
    prompt: tuple[dict, ...]
    """The messages up to the question: an optional system message, earlier turns, the user's question last."""
    answer: str
    """The reference answer, the assistant's last message."""

    @property
    def messages(self) -> list[dict]:
        """The whole conversation: the prompt and the answer."""
        return [dict(m) for m in self.prompt] + [{"role": "assistant", "content": self.answer}]


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _word(rng: np.random.Generator, letters: str, low: int, high: int) -> str:
    return "".join(rng.choice(list(letters), size=int(rng.integers(low, high + 1))))


def _question(prompt: Sequence[dict], pattern: str) -> Optional[re.Match]:
    return re.fullmatch(pattern, prompt[-1]["content"]) if prompt and prompt[-1].get("role") == "user" else None


def _make_arithmetic(rng):
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    if rng.integers(2):
        return [_user(f"What is {a} + {b}?")], str(a + b)
    a, b = max(a, b), min(a, b)
    return [_user(f"What is {a} - {b}?")], str(a - b)


def _solve_arithmetic(prompt):
    m = _question(prompt, r"What is (\d+) ([+-]) (\d+)\?")
    return m and str(int(m[1]) + int(m[3]) if m[2] == "+" else int(m[1]) - int(m[3]))


def _make_copy(rng):
    word = _word(rng, string.ascii_lowercase, 3, 10)
    return [_user(f"Copy: {word}")], word


def _solve_copy(prompt):
    m = _question(prompt, r"Copy: ([a-z]+)")
    return m and m[1]


def _make_reverse(rng):
    word = _word(rng, string.ascii_lowercase, 3, 10)
    return [_user(f"Reverse: {word}")], word[::-1]


def _solve_reverse(prompt):
    m = _question(prompt, r"Reverse: ([a-z]+)")
    return m and m[1][::-1]


def _make_count(rng):
    word, letter = _word(rng, COUNT_LETTERS, 4, 12), COUNT_LETTERS[int(rng.integers(len(COUNT_LETTERS)))]
    return [_user(f'Count "{letter}" in: {word}')], str(word.count(letter))


def _solve_count(prompt):
    m = _question(prompt, r'Count "([a-z])" in: ([a-z]+)')
    return m and str(m[2].count(m[1]))


def _make_lookup(rng):
    keys = [str(k) for k in rng.choice(LOOKUP_KEYS, size=int(rng.integers(2, 5)), replace=False)]
    values = [int(v) for v in rng.integers(0, 100, size=len(keys))]
    asked = int(rng.integers(len(keys)))
    facts = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
    return ([_user(f"Remember: {facts}."), {"role": "assistant", "content": "OK."}, _user(f"What is {keys[asked]}?")],
            str(values[asked]))


def _solve_lookup(prompt):
    m = _question(prompt, r"What is ([a-z]+)\?")
    if not m:
        return None
    for message in prompt[:-1]:
        facts = re.fullmatch(r"Remember: ((?:[a-z]+=\d+, )*[a-z]+=\d+)\.", message.get("content", ""))
        if message.get("role") == "user" and facts:
            found = dict(pair.split("=") for pair in facts[1].split(", "))
            if m[1] in found:
                return found[m[1]]
    return None


@dataclass(frozen=True)
class Skill:
    description: str
    make: Callable[[np.random.Generator], tuple[list[dict], str]]
    """rng -> (the turns up to the question, the answer)."""
    solve: Callable[[Sequence[dict]], Optional[str]]
    """A prompt -> its right answer, worked out from the prompt's own text; None if it is not this skill's."""


SKILLS: dict[str, Skill] = {
    "arithmetic": Skill("the sum or difference of two numbers below 100", _make_arithmetic, _solve_arithmetic),
    "copy": Skill("repeat a string of 3-10 letters", _make_copy, _solve_copy),
    "reverse": Skill("reverse a string of 3-10 letters", _make_reverse, _solve_reverse),
    "count": Skill(f"count one letter in a word of 4-12 letters of {COUNT_LETTERS!r}", _make_count, _solve_count),
    "lookup": Skill("the value of a name given, with 1-3 others, in an earlier turn", _make_lookup, _solve_lookup),
}


def chat_task(seed: int, index: int) -> ChatTask:
    """The index-th task of a seed: a skill, an optional system message, the turns and the answer."""
    rng = np.random.default_rng([seed, index])
    skill = list(SKILLS)[int(rng.integers(len(SKILLS)))]
    turns, answer = SKILLS[skill].make(rng)
    system = int(rng.integers(len(CHAT_SYSTEM) + 1))  # one in four has no system message
    head = [{"role": "system", "content": CHAT_SYSTEM[system]}] if system < len(CHAT_SYSTEM) else []
    return ChatTask(skill, tuple(head + turns), answer)


def is_heldout(task: ChatTask) -> bool:
    """Whether a task belongs to the held-out split: by a hash of its turns without the system message, so the same
    question is in one split only, whatever system message comes with it."""
    turns = [m for m in task.prompt if m["role"] != "system"]
    digest = hashlib.sha256(json.dumps([turns, task.answer], sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_SHARE == 0


def chat_tasks(seed: int, split: Literal["train", "heldout"], count: Optional[int] = None) -> list[ChatTask]:
    """The first `count` tasks of a split (CHAT_TRAIN or CHAT_HELDOUT by default): tasks 0, 1, 2, ... of the seed that
    fall in that split. The same for every call; a smaller count gives the start of a larger one."""
    if split not in ("train", "heldout"):
        raise LmlabError(f"the splits of synthetic:chat are train and heldout, not {split!r}")
    count = (CHAT_TRAIN if split == "train" else CHAT_HELDOUT) if count is None else count
    tasks: list[ChatTask] = []
    for index in itertools.count():
        if len(tasks) >= count:
            break
        task = chat_task(seed, index)
        if is_heldout(task) == (split == "heldout"):
            tasks.append(task)
    return tasks


def normalise_answer(text: str) -> str:
    """What verify compares: the answer without whitespace at either end."""
    return text.strip()


def solve(prompt: Sequence[dict]) -> Optional[tuple[str, str]]:
    """(skill, right answer) for a prompt of one of SKILLS, from the prompt's own text; None for any other."""
    for name, skill in SKILLS.items():
        answer = skill.solve(prompt)
        if answer is not None:
            return name, answer
    return None


def verify(prompt: Union[ChatTask, Sequence[dict]], answer: str) -> bool:
    """Whether `answer` is right for a synthetic:chat prompt: exact match, after normalise_answer, with the answer
    that the skill's solver works out from the prompt's text. `prompt` is a ChatTask, the messages up to the
    question, or a whole conversation (its last assistant message is left out). An LmlabError for a prompt that is
    none of the skills'."""
    messages = list(prompt.prompt if isinstance(prompt, ChatTask) else prompt)
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    solved = solve(messages)
    if solved is None:
        raise LmlabError("not a synthetic:chat prompt: no skill's question ends it")
    return normalise_answer(answer) == solved[1]

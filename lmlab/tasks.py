"""The tasks that reinforcement learning rewards (`lmlab train --stage rl --task NAME`): prompts split into those
trained on and those held out, each prompt's reference answer, and the verifier that scores a completion.

- `synthetic:chat[:SEED]`: the conversations of synthetic.py, their prompts the messages up to the question (its
  train split to train on, its held-out split to evaluate), checked by synthetic.verify.
- `patterns`: arithmetic statements "A plus B is " (2 <= A < B < 50, the statements of `lmlab experiment
  patterns`), a completion rewarded when it starts with the true sum followed by "."; a quarter of the pairs, chosen
  by a hash, is held out.

A reward is a number for (prompt, completion text); 1 for right and 0 for wrong here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Optional

from . import synthetic
from .common import LmlabError

NAMES = ("synthetic:chat", "patterns")
PATTERNS_RANGE = (2, 50)  # A and B of a statement: PATTERNS_RANGE[0] <= A < B < PATTERNS_RANGE[1]
PATTERNS_HELDOUT = 4  # one pair in this many is held out
_STATEMENT = re.compile(r"(\d+) plus (\d+) is ")


@dataclass(frozen=True)
class Prompt:
    """One prompt of a task."""

    text: str
    """What the model continues (for a conversation, its last user message; the model sees it rendered with the
    chat template)."""
    answer: str
    """The reference answer (for the held-out loss and the logs; the verifier decides what is right)."""
    group: str
    """What kind of prompt it is, for the figures by kind: a synthetic:chat skill, or "patterns"."""
    messages: Optional[tuple] = None
    """A conversation's messages up to the question; None for a plain-text prompt."""


@dataclass
class Task:
    """A task's prompts and verifier."""

    name: str
    train: list[Prompt]
    held_out: list[Prompt]

    @property
    def chat(self) -> bool:
        """Whether its prompts are conversations (answered in the chat template, to the end of the turn)."""
        return synthetic.is_chat(self.name)

    def reward(self, prompt: Prompt, completion: str) -> float:
        """The verifier's reward: 1.0 for a right completion, 0.0 for a wrong one."""
        if prompt.messages is not None:
            return float(synthetic.verify(prompt.messages, completion))
        return patterns_reward(prompt.text, completion)


def check_name(name: str) -> None:
    """Refuse a task that is not built in, in one line."""
    if name != "patterns" and not synthetic.is_chat(name):
        raise LmlabError(f"unknown --task {name!r}; the built-in tasks are {', '.join(NAMES)} (synthetic:chat:SEED "
                         f"for another seed); a reward of your own is given from Python: train(config, reward=fn)")


def load_task(name: str, held_out: Optional[int] = None) -> Task:
    """The task `name` (check_name's), with at most `held_out` held-out prompts (all when None)."""
    check_name(name)
    if name == "patterns":
        train, val = patterns_prompts()
    else:
        _, seed = synthetic.parse(name)
        train, val = ([Prompt(t.prompt[-1]["content"], t.answer, t.skill, t.prompt)
                       for t in synthetic.chat_tasks(seed, split)] for split in ("train", "heldout"))
    return Task(name, train, val if held_out is None else spread(val, held_out))


def spread(prompts: list[Prompt], count: int) -> list[Prompt]:
    """Up to `count` prompts as evenly spread over their groups as the list allows, in its order."""
    groups = sorted({p.group for p in prompts})
    share = -(-count // max(1, len(groups)))
    taken: dict[str, int] = {}
    out = []
    for p in prompts:
        if len(out) == count:
            break
        if taken.get(p.group, 0) < share:
            taken[p.group] = taken.get(p.group, 0) + 1
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------------------------
# patterns


def statement(a: int, b: int) -> Prompt:
    return Prompt(f"{a} plus {b} is ", f"{a + b}.", "patterns")


def _hash(a: int, b: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{a} plus {b}".encode()).digest()[:8], "big")


def is_held_out(a: int, b: int) -> bool:
    """Whether the pair (a, b) is held out: by a hash, so the split is the same for every seed and every caller."""
    return _hash(a, b) % PATTERNS_HELDOUT == 0


def patterns_prompts() -> tuple[list[Prompt], list[Prompt]]:
    """Every statement's prompt, (trained, held out), each in the order of their hashes (small and large numbers
    mixed, so that the first held-out ones are a fair sample)."""
    low, high = PATTERNS_RANGE
    pairs = sorted(((a, b) for a in range(low, high) for b in range(a + 1, high)), key=lambda pair: _hash(*pair))
    return ([statement(a, b) for a, b in pairs if not is_held_out(a, b)],
            [statement(a, b) for a, b in pairs if is_held_out(a, b)])


def patterns_reward(prompt: str, completion: str) -> float:
    """1.0 when the completion of "A plus B is " starts with the true sum followed by "." (what comes after is not
    judged), else 0.0. An LmlabError for a prompt that is not such a statement."""
    m = _STATEMENT.fullmatch(prompt)
    if m is None:
        raise LmlabError(f"not a patterns statement: {prompt!r} (expected 'A plus B is ')")
    return float(completion.startswith(f"{int(m[1]) + int(m[2])}."))

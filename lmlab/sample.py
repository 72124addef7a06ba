"""`lmlab sample`'s settings, the text of generated tokens as it streams (held back where a stop string may begin),
and the probe that training records at each evaluation (the top next tokens and a greedy continuation of fixed
prompts). The filters and the generation loop are generate.py's; they are importable from here too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import tyro
from typing_extensions import Annotated

from .common import LmlabError
from .generate import (  # noqa: F401 (the filters and the loop, importable from here as they always were)
    DECODE_CHUNK, Completion, ban, draw, filter_logits, find_stop, generate, generate_batch, next_token, sampling_probs,
    stop_prefix_length, uniforms,
)


def text_banned(tokenizer) -> list[int]:
    """The ids a continuation of plain text never draws: every special token (the end of a text, the chat roles'
    markers). A model trained on text never saw them; one fine-tuned on conversations ends its turns with them, in
    chat (where they stop generation), not in text."""
    return sorted(tokenizer.special_tokens.values())


@dataclass
class SampleConfig:
    """How to sample from a trained run."""

    prompt: str = ""
    """Text to continue (empty: start from a newline, or from token 0)."""
    max_new_tokens: int = 500
    """How many tokens to generate at most."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy (always the most likely token)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p (1: off)."""
    seed: int = 1337
    """Seed of the sampling generator (same seed, same text)."""
    stop: Optional[str] = None
    """Stop when this string has been generated (it is not printed)."""
    chat: Optional[str] = None
    """Instead of continuing --prompt, ask a chat model (a run fine-tuned on conversations) this question and print
    its answer, which ends where the model ends its turn."""
    no_cache: bool = False
    """Recompute the whole window for every token instead of using the KV cache."""
    compile: bool = False
    """Compile the cached decode steps with torch.compile: about 3x the tokens/s at batch 1 on CPU, after a first
    compile of one to two minutes (seconds once torch's compile cache on disk holds it)."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise LmlabError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LmlabError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise LmlabError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LmlabError(f"--top-k must be >= 0, got {self.top_k}")
        if self.chat is not None and self.prompt:
            raise LmlabError("--chat asks a chat model a question and --prompt gives a text to continue; give one")


# `lmlab sample`'s options: beside the settings they hold, so that the table of commands (cli.py) needs no torch
@dataclass
class SampleArgs:
    """Generate text from a trained run."""

    run: Annotated[str, tyro.conf.Positional]
    """The run directory."""
    checkpoint: str = "best"
    """Which checkpoint to load: best (the lowest validation loss; an rl run's highest held-out reward), last (the newest) or a step number."""
    settings: SampleConfig = field(default_factory=SampleConfig)


def stream_text(tokenizer, tokens: Iterator[int], stop: Optional[str] = None) -> Iterator[str]:
    """Decode generated tokens into text pieces as they come, ending before a stop string."""
    decoder = tokenizer.stream_decoder()
    if not stop:
        for t in tokens:
            piece = decoder.push(t)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail
        return
    held = ""  # text that might be the start of the stop string
    for t in tokens:
        held += decoder.push(t)
        at = find_stop(held, (stop,))
        if at is not None:
            if held[:at]:
                yield held[:at]
            return
        safe = len(held) - stop_prefix_length(held, (stop,))
        if safe:
            yield held[:safe]
            held = held[safe:]
    held += decoder.flush()
    at = find_stop(held, (stop,))
    yield held if at is None else held[:at]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    if prompt:
        ids = tokenizer.encode(prompt)
        if ids:
            return ids
    for start in ("\n", " "):
        try:
            ids = tokenizer.encode(start)
            if ids:
                return ids
        except LmlabError:
            continue
    return [0]


# ---------------------------------------------------------------------------------------------------------------
# Probe


def default_probe_prompts(val_tokens: np.ndarray, tokenizer, block_size: int, count: int = 3) -> list[str]:
    """A few fixed prompts cut from the validation text (at 0, 1/3 and 2/3 of it), starting at a line start."""
    n = len(val_tokens)
    length = max(4, min(32, block_size // 2))
    prompts = []
    for i in range(count):
        start = int(n * i / count)
        window = tokenizer.decode(np.asarray(val_tokens[start:start + 4 * length]).tolist())
        cut = window.find("\n")
        if 0 <= cut < len(window) - length:
            window = window[cut + 1:]
        text = window[: max(1, length)]
        if text.strip():
            prompts.append(text)
    return prompts


@torch.no_grad()
def probe(model: nn.Module, tokenizer, prompts: list[Union[str, list[int]]], top: int = 5,
          continuation: int = 40) -> list[dict]:
    """For each prompt: the top next-token predictions and a short greedy continuation. A text prompt is continued
    as text (text_banned: no special token); token ids (a rendered chat prompt, shown decoded) are answered as chat
    is, free to end the turn, and the continuation stops at the end of the turn (tokenizer.stop_ids)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = set(tokenizer.stop_ids)
    results = []
    for prompt in prompts:
        ids = (tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt))[-model.cfg.block_size:]
        if not ids:
            continue
        is_text = isinstance(prompt, str)
        prompt = prompt if is_text else tokenizer.decode(prompt)
        logits = model(torch.tensor([ids], device=device))
        probs = logits[0, -1].float().softmax(-1)
        p, idx = probs.topk(min(top, probs.numel()))
        tokens = generate(model, ids, continuation, temperature=0.0, banned=text_banned(tokenizer) if is_text else None)
        if not is_text:
            tokens = itertools.takewhile(lambda t: t not in stops, tokens)
        greedy = tokenizer.decode(list(tokens))
        results.append({
            "prompt": prompt,
            "top": [[tokenizer.decode([int(i)]), float(q)] for q, i in zip(p, idx)],
            "continuation": greedy,
        })
    model.train(was_training)
    return results

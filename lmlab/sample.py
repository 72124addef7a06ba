"""Generation: next-token filters (temperature, top-k, top-p) as pure functions, a KV-cached sampling loop, and the
probe that training records at each evaluation (the top next tokens and a greedy continuation of fixed prompts).

Context policy: the model sees at most block_size tokens. A prompt longer than that keeps its last block_size
tokens. When the window is full, it is cut to its newest block_size // 2 tokens, which are encoded again (with
the cache: one batched forward), and generation goes on. The cached and the recomputing paths use the same window,
so their outputs are identical.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from typing_extensions import Annotated

from .common import LmlabError


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Scale by 1/temperature, then set every token outside the top-k and outside the top-p nucleus to -inf.

    logits: (..., V). top_k <= 0 and top_p >= 1 turn those filters off. The most likely token is always kept.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0 here; temperature 0 means greedy (see sampling_probs)")
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p  # the nucleus is complete before this token
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution the next token is drawn from, (..., V) float32: softmax of the filtered logits, or, at
    temperature 0 (greedy), all of the mass on the most likely token."""
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    return filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """Pick the next token for each row of logits (B, V) with the generator's numbers (none spent when greedy)."""
    u = uniforms(logits.size(0), generator) if temperature else None
    return draw(logits, u, temperature, top_k, top_p)


def ban(logits: torch.Tensor, banned: Optional[torch.Tensor]) -> torch.Tensor:
    """logits (..., V) with the ids of `banned`, a (V,) bool mask, at -inf; unchanged when banned is None."""
    return logits if banned is None else logits.masked_fill(banned, float("-inf"))


def text_banned(tokenizer) -> list[int]:
    """The ids a continuation of plain text never draws: every special token (the end of a text, the chat roles'
    markers). A model trained on text never saw them; one fine-tuned on conversations ends its turns with them, in
    chat (where they stop generation), not in text."""
    return sorted(tokenizer.special_tokens.values())


def uniforms(rows: int, generator: Optional[torch.Generator], draws: int = 1) -> torch.Tensor:
    """The random numbers of `draws` draws: (rows, draws) float64 in [0, 1), from the CPU generator. One row of
    n draws holds the same numbers as n single draws one after another."""
    return torch.rand(rows, draws, generator=generator, dtype=torch.float64)


def draw(logits: torch.Tensor, u: Optional[torch.Tensor], temperature: float, top_k: int,
         top_p: float) -> torch.Tensor:
    """The next token for each row of logits (rows, V), drawn from sampling_probs with the uniform numbers u
    (rows, 1); at temperature 0 the most likely token, and u is not needed. A pure function, so it compiles."""
    if temperature == 0:  # the draw below would pick it too, but greedy decoding spends no random numbers
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    if probs.device.type == "mps":  # no float64 there
        probs = probs.cpu()
    # inverse-CDF draw: one uniform number per row against the cumulative distribution (faster than multinomial)
    cdf = probs.double().cumsum(dim=-1)
    token = torch.searchsorted(cdf, u.to(cdf.device) * cdf[..., -1:], right=True).squeeze(-1)
    return token.clamp_(max=probs.size(-1) - 1).to(logits.device)


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
    """Which checkpoint to load: best (the lowest validation loss), last (the newest) or a step number."""
    settings: SampleConfig = field(default_factory=SampleConfig)


def _step(model: torch.nn.Module, tokens: torch.Tensor, pos: Optional[torch.Tensor], cache,
          u: Optional[torch.Tensor], temperature: float, top_k: int, top_p: float,
          banned: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed tokens (1, T) through the cache and return the next token (1, 1), drawn with u (None when greedy), and
    the model's logits (1, V) it was drawn from (the banned ids, a (V,) bool mask, are never drawn).

    With pos, a (1,) tensor, this is one decode step at that position, with the same shapes at every position
    (KVCache.write), and pos advances; without, the tokens continue from cache.pos (the window's encoding).
    """
    logits = model(tokens, cache=cache, pos=pos)[:, -1]  # (1, V)
    token = draw(ban(logits, banned), u, temperature, top_k, top_p)
    if pos is not None:
        pos.add_(1)
    return token.view(1, 1), logits


DECODE_CHUNK = 8  # decode steps per compiled call (_decode)


def _decode(model: torch.nn.Module, token: torch.Tensor, pos: torch.Tensor, cache, u: Optional[torch.Tensor], n: int,
            temperature: float, top_k: int, top_p: float,
            banned: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n decode steps from token (1, 1) at pos, the i-th drawn with u[:, i] (u (1, n), None when greedy): the n new
    tokens (1, n), the last one as (1, 1) for the next call, and the logits (n, V) each was drawn from. Compiled,
    the loop unrolls into one graph, so n tokens cost one call's overhead."""
    tokens, logits = [], []
    for i in range(n):
        token, row = _step(model, token, pos, cache, None if u is None else u[:, i : i + 1], temperature, top_k, top_p,
                           banned)
        tokens.append(token)
        logits.append(row)
    return torch.cat(tokens, dim=1), token, torch.cat(logits)


@functools.cache
def _compiled(fn):
    """fn (_step or _decode) through torch.compile, once per process. Most of a batch-1 step of a small model is
    per-call overhead: cpp_wrapper calls the kernels from C++, and generate() makes every input itself, with the same
    shapes each time, so the compiled code need not assert them."""
    return torch.compile(fn, fullgraph=True, dynamic=False, options={"cpp_wrapper": True, "size_asserts": False})


@torch.inference_mode()
def generate(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, generator: Optional[torch.Generator] = None,
             use_cache: bool = True, compile: bool = False,
             with_logits: bool = False, banned: Optional[list[int]] = None
             ) -> Iterator[Union[int, tuple[int, torch.Tensor]]]:
    """Yield up to max_new_tokens token ids continuing `prompt` (see the module docstring for the window); with
    with_logits, (token id, logits) pairs instead, the logits (V,) being the model's raw ones (before temperature,
    filters and bans) that the token was drawn from, e.g. for its log-probability. `banned` ids are never drawn: they
    are left out of the draw like tokens outside top-k (text_banned(tokenizer): the special tokens, in a
    continuation of plain text).

    With the cache, the window is encoded in one forward and each further token is one decode step (_step).
    compile=True runs both through torch.compile, with runs of DECODE_CHUNK decode steps in one call (_decode) where
    the window has room for them (the first call of each compiles; the prompt, whose length varies, is encoded
    eagerly). Every path yields the same tokens for the same generator.
    """
    if not prompt:
        raise LmlabError("generation needs at least one prompt token")
    block = model.cfg.block_size
    keep = max(1, block // 2)
    device = next(model.parameters()).device
    window = list(prompt[-block:])
    mask = None
    if banned:
        mask = torch.zeros(model.vocab_size, dtype=torch.bool, device=device)
        mask[torch.tensor(sorted({i for i in banned if 0 <= i < model.vocab_size}), dtype=torch.long,
                          device=device)] = True
    if not use_cache:
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([window], device=device))[:, -1]  # (1, V)
            token = int(next_token(ban(logits, mask), temperature, top_k, top_p, generator)[0])
            yield (token, logits[0]) if with_logits else token
            window.append(token)
            if len(window) > block:
                window = window[-keep:]
        return
    step = _compiled(_step) if compile else _step
    # compiled, runs of `chunk` decode steps are one call each (_decode), which shares the per-call overhead out
    chunk = max(1, min(DECODE_CHUNK, block // 2)) if compile else 1
    cache = model.make_cache(1)
    # where the next decode step writes, for the static-shape step that compiles; eagerly, the plain cached forward
    # is cheaper (fewer ops than masking the whole cache)
    pos = torch.zeros(1, dtype=torch.long, device=device) if compile else None
    last = None  # the newest token as a (1, 1) tensor; None: the window has to be encoded from scratch
    warm = set() if compile else None  # the compiled decode calls that ran in this call with full guards (_call)
    produced = 0
    while produced < max_new_tokens:
        if last is None:
            u = uniforms(1, generator) if temperature else None  # the draw next_token would make
            cache.pos = 0
            encode = step if len(window) == keep else _step  # compiled for the re-encode, whose length is fixed
            last, logits = encode(model, torch.tensor([window], device=device), None, cache, u, temperature, top_k,
                                  top_p, mask)
            if pos is not None:
                pos.fill_(len(window))
            new = [int(last)]
        else:
            # decode steps left before the window is full (each appends a token), and tokens left to make
            n = chunk if min(block + 1 - len(window), max_new_tokens - produced) >= chunk else 1
            u = uniforms(1, generator, n) if temperature else None  # the same numbers as n draws of one
            if n > 1:
                tokens, last, logits = _call(_compiled(_decode), warm, model, last, pos, cache, u, n, temperature,
                                             top_k, top_p, mask)
                new = tokens[0].tolist()
            else:
                last, logits = _call(step, warm, model, last, pos, cache, u, temperature, top_k, top_p, mask)
                new = [int(last)]
        for token, row in zip(new, logits):  # logits: (len(new), V)
            yield (token, row) if with_logits else token
            produced += 1
            window.append(token)
        if len(window) > block:
            window = window[-keep:]
            last = None


def _call(fn, warm: Optional[set], *args):
    """fn(*args) for a decode call; warm is None when not compiling. Once fn has run in this generate() call with
    dynamo's full guard check, later calls with the same kind of inputs check only the guards that tell its compiled
    graphs apart (about 0.03-0.05 ms of a 0.4-0.5 ms single step here). The re-encode, whose first call compiles,
    never comes here."""
    if warm is None:
        return fn(*args)
    if fn in warm:
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return fn(*args)
    out = fn(*args)
    warm.add(fn)
    return out


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


def find_stop(text: str, stops: tuple[str, ...]) -> Optional[int]:
    """Where the first of the stop strings starts in text (None: nowhere)."""
    found = [at for at in (text.find(s) for s in stops) if at >= 0]
    return min(found) if found else None


def stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of text that begins a stop string: text that must be held back, because the next
    tokens may complete the stop string (0: none; text holding a whole stop string is find_stop's case)."""
    return max((k for stop in stops for k in range(1, min(len(stop) - 1, len(text)) + 1)
                if stop.startswith(text[-k:])), default=0)


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

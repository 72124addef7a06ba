"""Generation: the next-token filters (temperature, top-k, top-p) as pure functions of logits and the numbers of an
explicit generator, and the KV-cached loop that samples one sequence (`generate`) or several at once
(`generate_batch`, each row with its own prompt, generator, budget and stops).

Context policy: the model sees at most block_size tokens. A prompt longer than that keeps its last block_size
tokens. When the window is full, it is cut to its newest block_size // 2 tokens, which are encoded again (with
the cache: one batched forward), and generation goes on. The cached and the recomputing paths use the same window,
so their outputs are identical.

Rows: each row of a batch keeps its own window, and its own positions in the KV cache (its token at position t sits
in slot t of its row), so rows of different lengths need no padding: a decode step writes each row at its own slot
and each row's query sees its own slots 0..t (kvcache.KVCache.step). A row's window is cut when its own is full.
Each row draws its numbers from its own generator, in the order it would alone, so a row of a batch gets the tokens
that generate gives its prompt with the same generator (one row is generate itself).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

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


def find_stop(text: str, stops: tuple[str, ...]) -> Optional[int]:
    """Where the first of the stop strings starts in text (None: nowhere)."""
    found = [at for at in (text.find(s) for s in stops) if at >= 0]
    return min(found) if found else None


def stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of text that begins a stop string: text that must be held back, because the next
    tokens may complete the stop string (0: none; text holding a whole stop string is find_stop's case)."""
    return max((k for stop in stops for k in range(1, min(len(stop) - 1, len(text)) + 1)
                if stop.startswith(text[-k:])), default=0)



# ---------------------------------------------------------------------------------------------------------------
# The steps (eager, or compiled with static shapes)


def _step(model: torch.nn.Module, tokens: torch.Tensor, pos: Optional[torch.Tensor], cache,
          u: Optional[torch.Tensor], temperature: float, top_k: int, top_p: float,
          banned: Optional[torch.Tensor] = None,
          advance: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed tokens (B, T) through the cache and return the next token of each row (B, 1), drawn with u (B, 1) (None
    when greedy), and the model's logits (B, V) it was drawn from (the banned ids, a (V,) bool mask, are never drawn).

    With pos, a (B,) tensor, this is one decode step, each row at its own position, with the same shapes at every
    position (KVCache.step), and pos advances by advance (B,) (1 for the rows that go on, 0 for the others); without,
    the tokens continue from cache.pos (a window's encoding, or a decode step of rows that share their position).
    """
    logits = model(tokens, cache=cache, pos=pos)[:, -1]  # (B, V)
    token = draw(ban(logits, banned), u, temperature, top_k, top_p)
    if pos is not None:
        pos.add_(advance)
    return token.view(-1, 1), logits


DECODE_CHUNK = 8  # decode steps per run: one compiled call (_decode), or, eagerly, one draw of numbers and one sync


def _decode(model: torch.nn.Module, token: torch.Tensor, pos: Optional[torch.Tensor], cache, u: Optional[torch.Tensor],
            n: int, temperature: float, top_k: int, top_p: float, banned: Optional[torch.Tensor],
            advance: Optional[torch.Tensor], keep_logits: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """n decode steps from token (B, 1) at pos (None: every row at cache.pos), the i-th drawn with u[:, i] (u (B, n),
    None when greedy): the n new tokens (B, n), the last ones as (B, 1) for the next call, and the logits (B, n, V)
    each was drawn from (None unless keep_logits). Compiled, the loop unrolls into one graph, so n tokens cost one
    call's overhead."""
    tokens, logits = [], []
    for i in range(n):
        token, row = _step(model, token, pos, cache, None if u is None else u[:, i : i + 1], temperature, top_k, top_p,
                           banned, advance)
        tokens.append(token)
        if keep_logits:
            logits.append(row)
    return torch.cat(tokens, dim=1), token, torch.stack(logits, dim=1) if keep_logits else None


@functools.cache
def _compiled(fn):
    """fn (_step or _decode) through torch.compile, once per process. Most of a batch-1 step of a small model is
    per-call overhead: cpp_wrapper calls the kernels from C++, and the loop makes every input itself, with the same
    shapes each time, so the compiled code need not assert them."""
    return torch.compile(fn, fullgraph=True, dynamic=False, options={"cpp_wrapper": True, "size_asserts": False})


def _call(fn, warm: Optional[set], *args):
    """fn(*args) for a decode call; warm is None when not compiling. Once fn has run in this generation with
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


# ---------------------------------------------------------------------------------------------------------------
# The loop


class _Row:
    """One sequence being generated: its window (what the model sees), what it may still draw, and its stops."""

    def __init__(self, prompt: list[int], budget: int, generator: Optional[torch.Generator], block: int,
                 stop_ids: frozenset, stops: tuple[str, ...], tokenizer):
        if not prompt:
            raise LmlabError("generation needs at least one prompt token")
        self.window = list(prompt[-block:])
        self.left = budget  # tokens it may still draw
        self.generator = generator
        self.done = budget <= 0
        self.fresh = True  # its window is to be encoded (at the start, and after each cut)
        self.at = 0  # the cache slot its newest token is written to by the next decode step
        self.stop_ids, self.stops = stop_ids, stops
        self.decoder = tokenizer.stream_decoder() if stops else None
        self.text = ""

    def take(self, token: int, block: int, keep: int) -> Optional[str]:
        """Append a drawn token: None while the row goes on, or why it ended ("stop": a stop id, or the end of a
        stop string; "length": its budget). A full window is cut to its newest `keep` tokens, to be encoded again."""
        self.left -= 1
        self.window.append(token)
        finish = None
        if token in self.stop_ids:
            finish = "stop"
        elif self.decoder is not None:
            before = len(self.text)
            self.text += self.decoder.push(token)
            longest = max(len(s) for s in self.stops)
            if find_stop(self.text[max(0, before - longest + 1):], self.stops) is not None:
                finish = "stop"
        if finish is None and self.left <= 0:
            finish = "length"
        if finish is not None:
            self.done = True
        elif len(self.window) > block:
            self.window = self.window[-keep:]
            self.fresh = True
        return finish

    def numbers(self, n: int = 1) -> torch.Tensor:
        """The uniform numbers of its next n draws, (1, n): from its own generator, as alone."""
        return uniforms(1, self.generator, n)


def _stack(numbers: list[torch.Tensor]) -> torch.Tensor:
    """The rows' numbers (1, n) each as one (rows, n) tensor; one row's as they are (no copy: batch 1 decodes faster)."""
    return numbers[0] if len(numbers) == 1 else torch.cat(numbers)


def banned_mask(model: torch.nn.Module, banned: Optional[Sequence[int]], device) -> Optional[torch.Tensor]:
    """(V,) bool: the ids of `banned` that the model has (None for none), which `ban` takes."""
    if not banned:
        return None
    mask = torch.zeros(model.vocab_size, dtype=torch.bool, device=device)
    mask[torch.tensor(sorted({i for i in banned if 0 <= i < model.vocab_size}), dtype=torch.long, device=device)] = True
    return mask


def _generate_rows(model: torch.nn.Module, rows: list[_Row], temperature: float, top_k: int, top_p: float,
                   use_cache: bool, compile: bool, banned: Optional[Sequence[int]], keep_logits: bool = True
                   ) -> Iterator[tuple[int, int, Optional[torch.Tensor], Optional[str]]]:
    """The one loop behind generate and generate_batch. Yields (row, token, logits, finish) for every token drawn, in
    order within each row: the model's raw logits (V,) it was drawn from (None unless keep_logits), and finish None
    while the row goes on, or why it ended (_Row.take). A finished row draws no more numbers.

    The KV cache is made once. Decode steps go in runs of up to DECODE_CHUNK (less where a window fills up first or
    every row's budget ends sooner): each row draws the numbers of a run at once, and the run's tokens come back in
    one sync. A run may go past a row's stop (the rest of its run is dropped, and its generator has spent those
    numbers). Eagerly, ended rows leave the cache (KVCache.keep) once they are an eighth of it, and the cache has only
    the slots the rows can fill; compiled, shapes stay fixed (ended rows are masked) and a run is one call. Alone (one
    row, eager), a run is one step: the numbers spent are those of the tokens yielded."""
    mask = banned_mask(model, banned, next(model.parameters()).device)
    if not use_cache:
        yield from _uncached(model, rows, temperature, top_k, top_p, mask, keep_logits)
        return
    batch = _Batch(model, rows, temperature, top_k, top_p, compile, mask, keep_logits)
    block, keep = batch.block, batch.keep
    while batch.going():
        batch.compact()
        drawn = batch.decode() + batch.encode()
        for where, tokens, logits in drawn:
            tokens = tokens.tolist()
            for b, k in where.items():
                row = rows[b]
                for j, token in enumerate(tokens[k]):
                    yield b, token, None if logits is None else logits[k, j], row.take(token, block, keep)
                    if row.fresh or row.done:  # the rest of a run of steps is not its own: cut, or ended
                        batch.pos = None
                        break


def _uncached(model: torch.nn.Module, rows: list[_Row], temperature: float, top_k: int, top_p: float,
              mask: Optional[torch.Tensor], keep_logits: bool) -> Iterator[tuple]:
    """The reference: the whole window again for every token, row by row (_generate_rows without the cache)."""
    block = model.cfg.block_size
    keep = max(1, block // 2)
    device = next(model.parameters()).device
    while live := [b for b, row in enumerate(rows) if not row.done]:
        logits = torch.cat([model(torch.tensor([rows[b].window], device=device))[:, -1] for b in live])  # (n, V)
        u = torch.cat([rows[b].numbers() for b in live]) if temperature else None
        for b, token, row_logits in zip(live, draw(ban(logits, mask), u, temperature, top_k, top_p).tolist(), logits):
            yield b, token, row_logits if keep_logits else None, rows[b].take(token, block, keep)


class _Batch:
    """The cached generation of _generate_rows: the rows' one KV cache and what its decode steps need. Each turn of
    the loop compacts the cache (drops ended rows), decodes the rows that go on (one run of steps) and encodes the
    fresh windows; both hand back what they drew as (row -> its index in the tensors, tokens (., n), logits (., n, V)
    or None), which the loop gives out row by row."""

    def __init__(self, model: torch.nn.Module, rows: list[_Row], temperature: float, top_k: int, top_p: float,
                 compile: bool, mask: Optional[torch.Tensor], keep_logits: bool):
        self.model, self.rows, self.compile, self.mask, self.keep_logits = model, rows, compile, mask, keep_logits
        self.sampling = (temperature, top_k, top_p)
        self.block = model.cfg.block_size
        self.keep = max(1, self.block // 2)
        self.device = next(model.parameters()).device
        self.step = _compiled(_step) if compile else _step
        self.chunk = max(1, min(DECODE_CHUNK, self.block // 2)) if compile or len(rows) > 1 else 1
        # eagerly, the slots that a run of steps can reach (a short generation need not read a long block's), since
        # a run goes on while any row has tokens left; compiled, the block's, so that every call has the same shapes
        self.max_len = self.block if compile else min(self.block, max(len(r.window) for r in rows)
                                                      + max(r.left for r in rows))
        self.cache = model.make_cache(len(rows), max_len=self.max_len, grow=not compile)
        self.held = list(range(len(rows)))  # the row of each cache row (the rows that go on, at the front, once compacted)
        self.last = torch.zeros(len(rows), 1, dtype=torch.long, device=self.device)  # each cache row's newest token
        self.pos = self.advance = None  # (B,) the cache rows' slots and which go on: made again after any change
        self.warm = set() if compile else None  # the compiled decode calls that ran with full guards (_call)

    def going(self) -> bool:
        return any(not self.rows[b].done for b in self.held)

    def compact(self) -> None:
        """Eagerly, drop the ended rows from the cache once they are an eighth of it: their steps would cost as much."""
        rows, held = self.rows, self.held
        ended = sum(rows[b].done for b in held)
        if ended and not self.compile and ended * 8 >= len(held):
            going = [i for i, b in enumerate(held) if not rows[b].done]
            index = torch.tensor(going, device=self.device)
            self.cache.keep(index, max(rows[held[i]].at for i in going) + 1)
            self.last, self.held, self.pos = self.last.index_select(0, index), [held[i] for i in going], None

    def decode(self) -> list[tuple]:
        """One run of decode steps of the rows that go on and have their window encoded (none: [])."""
        rows, held, B = self.rows, self.held, len(self.held)
        decoding = [i for i, b in enumerate(held) if not rows[b].done and not rows[b].fresh]
        if not decoding:
            return []
        # decode steps left before a window is full (each appends a token), and tokens left to make
        room = min(self.block + 1 - len(rows[held[i]].window) for i in decoding)
        left = max(rows[held[i]].left for i in decoding)
        if self.compile:  # one of two shapes of call: a whole run, or one step
            n = self.chunk if min(room, min(rows[held[i]].left for i in decoding)) >= self.chunk else 1
        else:
            n = max(1, min(self.chunk, room, left))
        going = set(decoding)  # the other rows draw nothing: zeros for their numbers, slot 0 for their writes
        u = _stack([rows[b].numbers(n) if i in going else torch.zeros(1, n, dtype=torch.float64)
                    for i, b in enumerate(held)]) if self.sampling[0] else None  # (B, n)
        slots = {rows[held[i]].at for i in decoding}
        if not self.compile and len(slots) == 1:  # one shared slot: the plain cached step, cheaper than masking
            self.cache.pos, self.pos, at = slots.pop(), None, None
        else:
            if self.pos is None:
                self.pos = torch.tensor([rows[b].at if i in going else 0 for i, b in enumerate(held)],
                                        device=self.device)
                self.advance = torch.tensor([int(i in going) for i in range(B)], device=self.device)
            at = self.pos
        if n > 1:
            fn = _compiled(_decode) if self.compile else _decode
            tokens, self.last, logits = _call(fn, self.warm, self.model, self.last, at, self.cache, u, n,
                                              *self.sampling, self.mask, self.advance, self.keep_logits)
        else:
            self.last, logits = _call(self.step, self.warm, self.model, self.last, at, self.cache, u, *self.sampling,
                                      self.mask, self.advance)
            tokens, logits = self.last, logits.unsqueeze(1) if self.keep_logits else None
        for i in decoding:
            rows[held[i]].at += n
        return [({held[i]: i for i in decoding}, tokens, logits)]

    def encode(self) -> list[tuple]:
        """The fresh windows (new prompts, windows cut), one forward per window length, into the cache."""
        rows, held, B, drawn = self.rows, self.held, len(self.held), []
        encoding = [i for i, b in enumerate(held) if rows[b].fresh]
        for length in sorted({len(rows[held[i]].window) for i in encoding}):
            group = [i for i in encoding if len(rows[held[i]].window) == length]
            u = _stack([rows[held[i]].numbers() for i in group]) if self.sampling[0] else None
            whole = len(group) == B  # into the cache itself; else into a cache of its own, copied into its rows
            part = self.cache if whole else self.model.make_cache(len(group), max_len=self.max_len)
            part.pos = 0
            # compiled for the re-encode, whose shape is fixed
            encode = self.step if whole and length == self.keep else _step
            token, logits = encode(self.model, torch.tensor([rows[held[i]].window for i in group],
                                                            device=self.device), None, part, u, *self.sampling,
                                   self.mask)
            if whole:
                self.last = token
            else:
                index = torch.tensor(group, device=self.device)
                self.last = self.last.index_copy(0, index, token)
                self.cache.reserve(self.max_len)  # the part's slots
                for mine, its in zip(self.cache.k + self.cache.v, part.k + part.v):
                    mine[: self.cache.rows].index_copy_(0, index, its)
            for i in group:
                rows[held[i]].fresh, rows[held[i]].at = False, length
            drawn.append(({held[i]: k for k, i in enumerate(group)}, token,
                          logits.unsqueeze(1) if self.keep_logits else None))
            self.pos = None
        return drawn


# ---------------------------------------------------------------------------------------------------------------
# One sequence, or several at once


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
    continuation of plain text). It never stops early: the caller stops iterating where it wants.

    With the cache, the window is encoded in one forward and each further token is one decode step (_step).
    compile=True runs both through torch.compile, with runs of DECODE_CHUNK decode steps in one call (_decode) where
    the window has room for them (the first call of each compiles; the prompt, whose length varies, is encoded
    eagerly). Every path yields the same tokens for the same generator. This is generate_batch's loop with one row.
    """
    row = _Row(prompt, max_new_tokens, generator, model.cfg.block_size, frozenset(), (), None)
    for _, token, logits, _ in _generate_rows(model, [row], temperature, top_k, top_p, use_cache, compile, banned,
                                              with_logits):
        yield (token, logits) if with_logits else token


@dataclass
class Completion:
    """One row of generate_batch."""

    tokens: list[int]
    """The tokens drawn, in order; the last is the stop id, or the end of the stop string, that ended the row."""
    finish_reason: str
    """"stop" (a stop id or a stop string ended it) or "length" (its max_new_tokens were drawn)."""
    logits: Optional[torch.Tensor] = None
    """With with_logits: (len(tokens), V), the model's raw logits each token was drawn from (as generate's)."""
    logprobs: Optional[list[float]] = None
    """With with_logits: each token's log-probability under the model (log-softmax of those logits, float32)."""


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, prompts: Sequence[list[int]], max_new_tokens: Union[int, Sequence[int]],
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   seeds: Optional[Sequence[int]] = None,
                   generators: Optional[Sequence[Optional[torch.Generator]]] = None,
                   stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer=None,
                   banned: Optional[list[int]] = None, use_cache: bool = True, compile: bool = False,
                   with_logits: bool = False) -> list[Completion]:
    """Continue every prompt at once, one row of a batch each, and return one Completion per prompt, in order.

    Prompts may differ in length (each row keeps its own window and cache positions: no padding). A row ends on its
    own, at the first of: one of `stop_ids` drawn (the end of a chat turn, the end of text: tokenizer.stop_ids), the
    text of its tokens holding one of `stop_strings` (decoded with `tokenizer`, which they need), or its budget
    (max_new_tokens: one for every row, or one per row) spent. An ended row draws nothing more; its tokens end with
    the token that ended it. Sampling (temperature, top_k, top_p, banned ids) is generate's, for every row.

    Seeding: row i draws its numbers from its own generator: torch.Generator().manual_seed(seeds[i]), or
    generators[i] (advanced in place; None: torch's global one, shared by the rows). A row then gets the same tokens,
    and the same logits up to the summation order of batched kernels, as
    generate(model, prompts[i], ..., generator=torch.Generator().manual_seed(seeds[i])) up to where it ended. Greedy
    decoding (temperature 0) draws no numbers.

    Speed: the cache is made once, with the slots the rows can fill; eagerly, ended rows leave the batch (once they
    are an eighth of it), and decode steps go in runs of up to DECODE_CHUNK with one draw of numbers per row and one
    sync per run. A run may go on past a row's stop: its tokens are dropped, but its generator
    has spent their numbers. compile=True compiles the decode steps as generate's does (once per batch size; ended
    rows stay in the batch, masked); prompts are encoded eagerly, one forward per distinct length.
    """
    if seeds is not None and generators is not None:
        raise ValueError("give seeds or generators, not both")
    if seeds is not None:
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    generators = [None] * len(prompts) if generators is None else list(generators)
    if not (len(budgets) == len(generators) == len(prompts)):
        raise ValueError("prompts, max_new_tokens, and seeds or generators need one entry per row")
    stops = tuple(s for s in stop_strings if s)
    if stops and tokenizer is None:
        raise ValueError("stop strings need the tokenizer that decodes the tokens")
    block = model.cfg.block_size
    rows = [_Row(p, n, g, block, frozenset(stop_ids), stops, tokenizer) for p, n, g in zip(prompts, budgets, generators)]
    if not rows:
        return []
    tokens: list[list[int]] = [[] for _ in rows]
    logits: list[list[torch.Tensor]] = [[] for _ in rows]
    finish = ["length"] * len(rows)
    for b, token, row_logits, ended in _generate_rows(model, rows, temperature, top_k, top_p, use_cache, compile,
                                                      banned, with_logits):
        tokens[b].append(token)
        if with_logits:
            logits[b].append(row_logits)
        if ended:
            finish[b] = ended
    out = [Completion(t, f) for t, f in zip(tokens, finish)]
    if with_logits:
        for c, rows_logits in zip(out, logits):
            c.logits = torch.stack(rows_logits) if rows_logits else torch.empty(0, model.vocab_size)
            picked = c.logits.float().log_softmax(-1).gather(-1, torch.tensor(c.tokens, dtype=torch.long,
                                                                              device=c.logits.device)[:, None])
            c.logprobs = picked[:, 0].tolist()
    return out

"""The KV cache of incremental decoding (model.py's attention writes and reads it; generate.py makes one per batch):
the keys and values of every layer in buffers made once, a decode step's write at each row's own slot, and the
layout tricks that keep a batched decode step's products on contiguous operands."""

from __future__ import annotations

from typing import Optional

import torch


WHOLE_CACHE_HEADS = 128  # from this many heads (batch x n_head) a decode step may read the whole cache (KVCache.unfilled)


GROW_SLOTS = 16  # a growing KVCache's slots go up in steps of this many (KVCache.reserve; 8 and 32 were slower)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding: preallocated once, for `batch`
    rows of max_len slots, and never reallocated. With grow, the buffers (B, H, slots, D) start with fewer slots, and
    `reserve` gives them more within the same memory, so that a decode step can read every slot of contiguous
    buffers (see `unfilled`) when few are filled yet.

    `append` grows the cached prefix (pos counts it). `step` is a decode step's (one token per row): the buffers and
    where to write (fused_decode.write) and how to read them. At a position given as a tensor, it is the decode step
    with static shapes: the whole buffers, which attention masks, so every step has the same shapes and torch.compile
    compiles it once (and the products against them get contiguous operands: a slice of the slots, with its gaps
    between rows, took a slower batched-matmul path, 3.4x at batch 64 on the 2-core AMD EPYC it was timed on; on
    the 2-vCPU Intel Xeon without native bf16 it costs the same). `rows` is the number of rows in use, the first ones: `keep`
    moves the rows that go on to the front.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, device, dtype,
                 grow: bool = False):
        # one tensor per layer, not views of one: a compiled step can then update them in place
        self.k = [torch.zeros(batch, n_head, max_len, head_dim, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.max_len = max_len
        self._memory = [buffer.view(-1) for buffer in self.k + self.v]  # what reserve lays the buffers out in
        if grow:
            self._lay_out(min(max_len, GROW_SLOTS))
        self.pos = 0  # number of positions already cached
        self.rows = batch
        self._index = torch.arange(batch, device=device)  # each row's index, for a write at one position per row
        self._unfilled: Optional[tuple[int, int, torch.Tensor]] = None  # (filled, slots, the mask) of the last step

    def _lay_out(self, slots: int) -> None:
        B, H, _, D = self.k[0].shape
        buffers = [memory[: B * H * slots * D].view(B, H, slots, D) for memory in self._memory]
        self.k, self.v = buffers[: len(self.k)], buffers[len(self.k) :]

    def reserve(self, slots: int) -> None:
        """Room for `slots` slots in every row: the buffers grow to that, rounded up to GROW_SLOTS (at most max_len),
        keeping their contents; nothing when they have the room."""
        if not self.k or slots <= self.k[0].size(2):
            return
        _, H, old, D = self.k[0].shape
        new = min(self.max_len, -(-slots // GROW_SLOTS) * GROW_SLOTS)
        # each (row, head) of the rows in use moves from i * old * D to i * new * D, in place (a copy would allocate
        # and write twice as much): from the last down, in runs whose old places end before their new ones begin
        runs, end = [], self.rows * H
        while end > 1:
            start = -(-end * old // new)
            if start >= end:  # the first ones overlap their own new places: through a copy
                runs.append((1, end, True))
                break
            runs.append((start, end, False))
            end = start
        for memory in self._memory:
            for start, end, overlap in runs:
                src = memory[start * old * D : end * old * D].view(end - start, old * D)
                dst = memory.as_strided((end - start, old * D), (new * D, 1), start * new * D)
                dst.copy_(src.clone() if overlap else src)
        self._lay_out(new)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.size(2)
        if layer == 0:
            self.reserve(self.pos + T)
        keys, values = self.k[layer][: self.rows], self.v[layer][: self.rows]
        keys[:, :, self.pos : self.pos + T] = k
        values[:, :, self.pos : self.pos + T] = v
        return keys[:, :, : self.pos + T], values[:, :, : self.pos + T]

    def unfilled(self, heads: int) -> Optional[torch.Tensor]:
        """For one query per row against the first pos + 1 slots (a decode step, after append): the (slots,) float
        mask of the slots after them (-inf there, 0 before; added to the scores), when the products against the whole
        buffers with this mask are cheaper than against the slice (None: read the slice). A slice's rows have gaps
        between them, which sent the batched matmul down a slower path on the 2-core AMD EPYC this was timed on: at
        batch 64 (256 heads of tiny) the whole buffers win once the slice is a third of them; at batch 8 they never
        do. On the 2-vCPU Intel Xeon without native bf16 the two reads cost the same (docs/performance.md times
        both)."""
        filled, slots = self.pos + 1, self.k[0].size(2) if self.k else 0
        if heads < WHOLE_CACHE_HEADS or 3 * filled < slots:
            return None
        if self._unfilled is None or self._unfilled[:2] != (filled, slots):  # once per step, not once per layer
            after = torch.arange(slots, device=self._index.device) >= filled
            self._unfilled = (filled, slots, torch.zeros(slots, dtype=self.k[0].dtype,
                                                         device=after.device).masked_fill_(after, float("-inf")))
        return self._unfilled[2]

    def step(self, layer: int, pos: Optional[torch.Tensor], heads: int) -> tuple:
        """Where a decode step (one token per row, `heads` = rows x heads of queries) of `layer` writes and how it
        reads, for fused_decode.write_attend (or write): (keys, values, past, rows, at, mode, mask). keys and values are the
        layer's buffers (B, H, slots, D) of the rows in use. Without pos, the step writes at slot `past` = cache.pos
        of every row (cache.pos stays as it is until the forward's end) and reads as `unfilled` says; with pos, a (1,)
        or (B,) tensor (rows of different lengths, generated together), at slot at[i] of row rows[i], reading the whole
        buffers up to each row's slot.
        mode says how (fused_decode.attend): "whole", the whole buffers, the slots after the filled ones masked by an
        additive (slots,) mask; "masked", the whole buffers, each row's visible slots a bool (B|1, 1, 1, slots) mask;
        "causal", the filled slots as a causal window (a prompt's first token); "plain", the filled slots."""
        if layer == 0:
            self.reserve(self.max_len if pos is not None else self.pos + 1)
        keys, values = self.k[layer][: self.rows], self.v[layer][: self.rows]
        if pos is not None:
            S = keys.size(2)
            visible = (torch.arange(S, device=pos.device) <= pos.view(-1, 1)).view(-1, 1, 1, S)  # (B|1, 1, 1, slots)
            return keys, values, 0, self._index[: self.rows], pos.expand(self.rows), "masked", visible
        unfilled = self.unfilled(heads)
        mode = "whole" if unfilled is not None else "causal" if self.pos == 0 else "plain"
        return keys, values, self.pos, None, None, mode, unfilled

    def steps(self, pos: Optional[torch.Tensor], heads: int) -> list[tuple]:
        """`step` for every layer at once: the first layer's, and each other layer's own buffers with the same
        slots, mode and mask (what `step` would give it, without making them again)."""
        first = self.step(0, pos, heads)
        return [first] + [(keys[: self.rows], values[: self.rows]) + first[2:]
                          for keys, values in zip(self.k[1:], self.v[1:])]

    def keep(self, index: torch.Tensor, slots: int) -> None:
        """Keep only the rows at `index` (their first `slots` slots), moved in place to the front, in that order:
        the rows that go on of a batch whose other rows ended, so that the ended ones cost nothing more."""
        for buffer in self.k + self.v:
            buffer[: len(index), :, :slots] = buffer[: self.rows, :, :slots].index_select(0, index)
        self.rows = len(index)

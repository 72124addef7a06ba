"""Supervised fine-tuning (`lmlab train --stage sft`): what changes when a run trains on conversations rather than
text. The loop, the run folder, checkpoints, resume, logs and records are train.py's; this module holds the data
side and the evaluation that differ:

- `load_chat_data`: the --data conversations (data.load_conversations) checked against the tokenizer and rendered
  through its chat template (chat.render_all) into token ids and loss masks that fit a block, with the turns cut
  and the conversations left out said; and the held-out prompts with a verifier (synthetic:chat) that validation
  answers. Or TRL's prompt-completion format, plain text without a chat template (`Completion`: a .jsonl file of
  {"prompt", "completion"} lines; the ids are the prompt's, then the completion's and the end of text, and only
  the completion and the end of text are trained).
- `PackedSampler`: the training batches. Each optimizer step draws conversations with a seeded generator (its state
  is the sampler's whole state, saved in checkpoints like BatchSampler's) and packs them, whole, into blocks of
  block_size + 1 tokens; a block's tokens carry the id of their conversation, so the model keeps conversations apart
  (model.Packing: no attention across them, positions restarting at each), and padding is never trained.
- `evaluate_chat`: the masked loss (and bits/byte, accuracy) of the held-out conversations, packed the same way.
- `answer_tasks`: greedy answers to fixed held-out prompts, checked by the data's verifier: exact match by skill,
  and the share of answers that end their turn.
- `evaluate_run`: `lmlab eval` of a fine-tuned run: the same measures on its held-out conversations, or a file's.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import chat, synthetic
from . import tokenizer as tok
from .common import LmlabError
from .config import TrainConfig
from .data import ConversationSplits, hold_out, is_conversations, load_conversations
from .distributed import Dist, all_reduce_sum
from .evaluate import autocast_context
from .loss import Metrics, cross_entropy
from .sample import generate

TASKS = 100  # held-out prompts answered at each evaluation, spread evenly over the skills
ANSWER_TOKENS = 32  # at most this many tokens an answer; one that has not ended its turn by then has run on
PROBES = 3  # held-out prompts for the probe and the inside records


@dataclass
class Task:
    """A held-out prompt that validation answers, and the skill whose verifier checks the answer."""

    skill: str
    prompt: list[dict]
    """The messages up to the user's question."""
    ids: list[int]
    """The prompt rendered with the generation prompt: what the model continues."""


@dataclass
class ChatData:
    """The conversations of an SFT run, rendered for its tokenizer and context."""

    train: list[chat.Rendered]
    val: list[chat.Rendered]
    tasks: list[Task]
    """Held-out prompts with a verifier (synthetic:chat); empty for a file's conversations."""
    prompts: list[list[int]]
    """A few held-out prompts, rendered to be answered: the probe's and the final sample's."""
    plain: bool = False
    """Whether the data are prompt-completion texts (the run continues text) rather than conversations."""

    def stream(self, split: str) -> np.ndarray:
        """A split's conversations one after another as one token stream (what a text run's split is): for the
        loss by position that the inside records keep, and for counting passes over the training data."""
        rendered = self.train if split == "train" else self.val
        return np.concatenate([r.ids for r in rendered]).astype(np.int64)


def read_chat_data(source: str, val_data: Optional[str], val_fraction: float, seed: int) -> ConversationSplits:
    """The conversations that --data (and --val-data) name, each file checked whole (data.load_conversations), or
    the prompt-completion pairs of a .jsonl file whose first line is one (read_completions): read before anything
    else, so that a malformed line or row is the one thing said."""
    if is_completion_file(source):
        pairs = read_completions(source)
        if val_data:
            return ConversationSplits(pairs, read_completions(val_data), source)
        return ConversationSplits(*hold_out(pairs, val_fraction, seed, source, "prompt-completion pair"), source)
    return load_conversations(source, val_data, val_fraction, seed)


# ---------------------------------------------------------------------------------------------------------------
# Prompt-completion pairs (TRL's format, plain text)


@dataclass
class Completion:
    """A prompt and the completion that is trained after it: plain text, no chat template."""

    prompt: str
    completion: str
    where: str = ""


def check_completion(obj, where: str = "") -> Completion:
    """A line's object as a Completion, or one LmlabError saying what is wrong with it."""
    if not isinstance(obj, dict) or "prompt" not in obj or "completion" not in obj:
        raise LmlabError("a line of a prompt-completion file is {\"prompt\": text, \"completion\": text}")
    for key in ("prompt", "completion"):
        if not isinstance(obj[key], str) or not obj[key]:
            raise LmlabError(f"{key} must be a non-empty string (prompt-completion pairs are plain text)")
        if len(obj[key]) > chat.MAX_CONTENT_CHARS:
            raise LmlabError(f"{key} has {len(obj[key]):,} characters, more than {chat.MAX_CONTENT_CHARS:,}")
    return Completion(obj["prompt"], obj["completion"], where)


def is_completion_file(path: str) -> bool:
    """Whether --data is a .jsonl file whose first line is an object with a "prompt" and a "completion"."""
    if not str(path).endswith(".jsonl") or not Path(path).is_file():
        return False
    with open(path, "rb") as f:
        line = f.readline(chat.MAX_LINE_BYTES + 1)
        while line and not line.strip():
            line = f.readline(chat.MAX_LINE_BYTES + 1)
    try:
        first = json.loads(line.removeprefix(b"\xef\xbb\xbf"))
    except ValueError:
        return False  # not JSON (or too long): read_jsonl_records says which line and why
    return isinstance(first, dict) and "prompt" in first and "completion" in first


def are_completions(splits: Optional[ConversationSplits]) -> bool:
    """Whether what read_chat_data read are prompt-completion pairs (plain text) rather than conversations."""
    return splits is not None and bool(splits.train) and isinstance(splits.train[0], Completion)


def read_completions(path: str) -> list[Completion]:
    """Every pair of a prompt-completion .jsonl file (check_completion), the file checked whole."""
    return chat.read_jsonl_records(Path(path), check_completion, "prompt-completion pairs")


def encode_completion(tokenizer: tok.Tokenizer, pair: Completion) -> chat.Rendered:
    """The prompt's ids, then the completion's and the end of text (when the tokenizer has one), each text encoded
    apart; the mask covers the completion and the end of text."""
    try:
        prompt, completion = tokenizer.encode_array(pair.prompt), tokenizer.encode_array(pair.completion)
    except (KeyError, ValueError, LmlabError):
        raise LmlabError(f"{pair.where}: this {tokenizer.kind} tokenizer cannot encode its text") from None
    end = [tokenizer.special_tokens[tok.ENDOFTEXT]] if tok.ENDOFTEXT in tokenizer.special_tokens else []
    ids = np.concatenate([prompt, completion, end]).astype(np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    mask[len(prompt):] = True
    return chat.Rendered(ids, mask)


def load_completions(splits: ConversationSplits, val_data: Optional[str], tokenizer: tok.Tokenizer,
                     block_size: int, say: Callable[[str], None]) -> ChatData:
    """Prompt-completion pairs encoded (encode_completion); those longer than block_size + 1 tokens left out and
    said."""
    out = []
    for name, pairs in (("training", splits.train), ("held-out", splits.val)):
        encoded = [encode_completion(tokenizer, p) for p in pairs]
        kept = [e for e in encoded if len(e.ids) <= block_size + 1]
        say(f"{name} prompt-completion pairs of {splits.source if name == 'training' or not val_data else val_data}: "
            f"{len(kept):,} of {len(pairs):,} fit {block_size + 1:,} tokens")
        if not kept:
            raise LmlabError(f"none of the {name} prompt-completion pairs fits a context of {block_size} tokens")
        out.append(kept)
    prompts = [r.ids[: int(np.argmax(r.mask))].tolist() for r in out[1][:PROBES]]
    return ChatData(out[0], out[1], [], prompts, plain=True)


def load_chat_data(splits: ConversationSplits, val_data: Optional[str], tokenizer: tok.Tokenizer, block_size: int,
                   say: Callable[[str], None]) -> ChatData:
    """The conversations checked against the tokenizer (a char base's unseen characters) and rendered through its
    chat template to fit blocks of block_size + 1 tokens, what was cut or left out said (prompt-completion pairs:
    load_completions)."""
    if are_completions(splits):
        return load_completions(splits, val_data, tokenizer, block_size, say)
    if tokenizer.chat_template is None:
        raise LmlabError(f"this {tokenizer.kind} tokenizer has no chat template and none of lmlab's special tokens "
                         f"({', '.join(tok.SPECIAL_TOKENS)})")
    source = splits.source
    chat.check_characters(tokenizer, splits.train, source)
    chat.check_characters(tokenizer, splits.val, val_data or f"{source} (held out)")
    fit = block_size + 1
    rendered = []
    for name, conversations in (("training", splits.train), ("held-out", splits.val)):
        done = chat.render_all(tokenizer, conversations, fit)
        say(f"{name} conversations of {source if name == 'training' or not val_data else val_data}: "
            f"{done.summary(fit)}")
        if not done.rendered:
            raise LmlabError(f"none of the {name} conversations fits a context of {block_size} tokens")
        rendered.append(done)
    train, val = rendered
    held_out = [splits.val[i] for i in val.kept]
    tasks = choose_tasks(tokenizer, held_out, block_size)
    prompts = [task.ids for task in tasks[:PROBES]]
    for conversation in held_out[:PROBES] if not prompts else ():
        try:
            prompts.append(chat.render(tokenizer, conversation.messages[:-1], add_generation_prompt=True,
                                       max_tokens=block_size - 1).ids.tolist())
        except chat.ConversationTooLong:
            continue
    return ChatData(train.rendered, val.rendered, tasks, prompts)


def choose_tasks(tokenizer: tok.Tokenizer, conversations: Sequence[chat.Conversation], block_size: int,
                 count: Optional[int] = None) -> list[Task]:
    """Up to `count` (default TASKS) held-out prompts with a verifier, as evenly spread over the skills as the data
    allows: in the conversations' order, a skill's next prompt is taken while it has fewer than count / skills."""
    count = TASKS if count is None else count
    skills = sorted({c.skill for c in conversations if c.skill is not None})
    if not skills:
        return []
    share = -(-count // len(skills))
    taken: Counter = Counter()
    tasks = []
    for conversation in conversations:
        if len(tasks) == count:
            break
        if conversation.skill is None or taken[conversation.skill] >= share:
            continue
        prompt = conversation.messages[:-1]
        try:
            ids = chat.render(tokenizer, prompt, add_generation_prompt=True, max_tokens=block_size - 1).ids
        except chat.ConversationTooLong:
            continue
        taken[conversation.skill] += 1
        tasks.append(Task(conversation.skill, prompt, ids.tolist()))
    return tasks


# ---------------------------------------------------------------------------------------------------------------
# Packing


@dataclass
class PackedBatch:
    """A micro-batch of packed conversations: what train_step gives the model and the masked loss."""

    x: torch.Tensor
    """(B, T) input ids."""
    y: torch.Tensor
    """(B, T) target ids: x shifted by one."""
    documents: torch.Tensor
    """(B, T) which conversation of its row each input token belongs to (1, 2, ...; padding 0): model(x,
    documents=...) keeps them apart."""
    mask: torch.Tensor
    """(B, T) bool: the targets that are trained (what an assistant writes); False for the rest and for padding."""
    count: torch.Tensor
    """() float: the trained targets of the whole optimizer step over its micro-batches and processes, divided by
    their number: the masked loss's denominator, so that the step's loss is the mean over all its trained tokens."""


def row_parts(model: torch.nn.Module, batch: PackedBatch, objective: Callable, loss_cfg, parts: int
              ) -> list[Callable[[], torch.Tensor]]:
    """A packed micro-batch's rows shared among `parts` threads (threads.backward_in_parts): each part's loss is its
    trained targets' sum over the step's count, so the parts' losses add up to the micro-batch's whatever rows each
    holds (the rows are packed apart: a part's forward sees only its own)."""
    cut = [t.chunk(parts) for t in (batch.x, batch.y, batch.documents, batch.mask)]

    def loss(i: int) -> torch.Tensor:
        x, y, documents, mask = (c[i] for c in cut)
        return objective(model(x, documents=documents), y, loss_cfg, mask, batch.count)

    return [lambda i=i: loss(i) for i in range(len(cut[0]))]


def pack_rows(conversations: Sequence[chat.Rendered], rows: Sequence[Sequence[int]], block_size: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks of block_size + 1 tokens, one per row of conversation indices: (ids, trained, documents), each
    (len(rows), block_size + 1). A conversation's tokens are numbered 1, 2, ... by its place in the row, and the
    padding after them 0 (a sequence of its own, never trained); a conversation's first token is never trained
    either (it would be predicted from the end of the one before)."""
    width = block_size + 1
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    trained = np.zeros((len(rows), width), dtype=bool)
    documents = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for number, index in enumerate(row, 1):
            c = conversations[index]
            n = len(c.ids)
            ids[r, at:at + n] = c.ids
            trained[r, at + 1:at + n] = c.mask[1:]
            documents[r, at:at + n] = number
            at += n
        if at > width:
            raise ValueError(f"row {r} holds {at} tokens, more than {width}")
    return ids, trained, documents


def first_fit(lengths: np.ndarray, order: Sequence[int], blocks: int, width: int) -> list[list[int]]:
    """Conversations in `order` placed, whole, each into the first of `blocks` blocks of `width` tokens that has
    room; those that fit nowhere are left out. Returns each block's conversations."""
    room = np.full(blocks, width, dtype=np.int64)
    rows: list[list[int]] = [[] for _ in range(blocks)]
    for index in order:
        fits = np.flatnonzero(room >= lengths[index])
        if fits.size:
            rows[fits[0]].append(int(index))
            room[fits[0]] -= lengths[index]
    return rows


DRAWS = 256  # conversations drawn from the generator at a time


class PackedSampler:
    """Training batches of packed conversations, drawn by a seeded generator (the interface of data.BatchSampler).

    Each optimizer step fills its global batch (batch_size x grad_accum x world blocks) at once: conversations are
    drawn uniformly, with replacement, DRAWS at a time, and each goes into the first block with room for it
    (first-fit); drawing stops when no block has room for the shortest conversation, or after one draw per block
    that fit nowhere. Micro-step a of rank r takes chunk a * world + r, as BatchSampler does, so the data of a step
    does not depend on how it is split. The generator's state is the whole state (draws left over are discarded).
    """

    def __init__(self, conversations: Sequence[chat.Rendered], block_size: int, batch_size: int, seed: int,
                 device: torch.device, grad_accum: int = 1, rank: int = 0, world: int = 1, pad_id: int = 0):
        if not conversations:
            raise LmlabError("no conversations to train on")
        self.conversations = conversations
        self.lengths = np.array([len(c.ids) for c in conversations], dtype=np.int64)
        if self.lengths.max() > block_size + 1:
            raise LmlabError(f"a conversation of {self.lengths.max()} tokens does not fit a block of {block_size}+1")
        self.block_size, self.batch_size = block_size, batch_size
        self.grad_accum, self.rank, self.world = grad_accum, rank, world
        self.device, self.pad_id = device, pad_id
        self.generator = torch.Generator().manual_seed(seed)
        self._step: Optional[tuple[np.ndarray, ...]] = None
        self._count = 0.0
        self._micro = 0

    def draw_step(self) -> list[list[int]]:
        """The conversations of the next optimizer step, block by block (advances the generator)."""
        blocks = self.batch_size * self.grad_accum * self.world
        width = self.block_size + 1
        room = np.full(blocks, width, dtype=np.int64)
        rows: list[list[int]] = [[] for _ in range(blocks)]
        shortest, misses = int(self.lengths.min()), 0
        while room.max() >= shortest and misses < blocks:
            for index in torch.randint(len(self.lengths), (DRAWS,), generator=self.generator).tolist():
                fits = np.flatnonzero(room >= self.lengths[index])
                if fits.size:
                    rows[fits[0]].append(index)
                    room[fits[0]] -= self.lengths[index]
                else:
                    misses += 1
                if room.max() < shortest or misses >= blocks:
                    break
        return rows

    def next(self) -> PackedBatch:
        """The next micro-batch of this rank."""
        if self._micro == 0:
            ids, trained, documents = pack_rows(self.conversations, self.draw_step(), self.block_size, self.pad_id)
            self._step = (ids, trained, documents)
            self._count = float(trained[:, 1:].sum()) / (self.grad_accum * self.world)
        chunk = self._micro * self.world + self.rank
        rows = slice(chunk * self.batch_size, (chunk + 1) * self.batch_size)
        self._micro = (self._micro + 1) % self.grad_accum
        ids, trained, documents = (a[rows] for a in self._step)
        return to_batch(ids, trained, documents, self._count, self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self._micro = 0  # checkpoints are taken between optimizer steps


def to_batch(ids: np.ndarray, trained: np.ndarray, documents: np.ndarray, count: float,
             device: torch.device) -> PackedBatch:
    """Blocks of block_size + 1 tokens as a PackedBatch on the device: x the first block_size, y the last."""
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (ids[:, :-1], ids[:, 1:], documents[:, :-1],
                                                                   trained[:, 1:])]
    if device.type != "cpu":
        tensors = [t.to(device, non_blocking=device.type == "cuda") for t in tensors]
    return PackedBatch(*tensors, torch.tensor(max(count, 1.0), device=device))


# ---------------------------------------------------------------------------------------------------------------
# Validation


def validation_blocks(conversations: Sequence[chat.Rendered], block_size: int, max_tokens: int = 0,
                      pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The held-out conversations (the first ones whose tokens add up to max_tokens, when max_tokens > 0) packed
    first-fit in their order into as few blocks as that takes: the same blocks at every evaluation."""
    lengths = np.array([len(c.ids) for c in conversations], dtype=np.int64)
    keep = len(conversations) if max_tokens <= 0 else max(1, int(np.searchsorted(np.cumsum(lengths), max_tokens)))
    order = range(min(keep, len(conversations)))
    width = block_size + 1
    blocks = max(1, -(-int(lengths[: len(order)].sum()) // width))
    while True:  # first-fit into `blocks` blocks; more when some are left over
        rows = first_fit(lengths, order, blocks, width)
        if sum(map(len, rows)) == len(order):
            break
        blocks += max(1, blocks // 8)
    return pack_rows(conversations, [row for row in rows if row], block_size, pad_id)


@torch.no_grad()
def evaluate_chat(model: torch.nn.Module, blocks: tuple[np.ndarray, np.ndarray, np.ndarray],
                  token_bytes: torch.Tensor, batch_size: int = 32, dtype: torch.dtype = torch.float32,
                  d: Optional[Dist] = None) -> Metrics:
    """Loss, bits/byte and accuracy of the trained tokens (what the assistant writes) of packed held-out blocks,
    plain cross-entropy per token as every validation loss is. Data-parallel, rank r scores batches r, r + world,
    ... and every rank returns the totals of all (under FSDP a rank without a batch in the last round scores a
    stand-in batch, each forward being collective)."""
    d = d or Dist()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, trained, documents = blocks
    starts = list(range(0, len(ids), batch_size))
    rounds = -(-len(starts) // d.world)
    metrics = Metrics()
    for i in range(rounds * d.world if d.sharded else len(starts)):
        if i % d.world != d.rank:
            continue
        rows = slice(starts[i], starts[i] + batch_size) if i < len(starts) else slice(0, batch_size)
        batch = to_batch(ids[rows], trained[rows], documents[rows], 1.0, device)
        with autocast_context(device, dtype):
            logits = model(batch.x, documents=batch.documents)
        if i < len(starts):
            mask = batch.mask
            chosen = logits[mask]  # (N, V): the trained targets' logits
            targets = batch.y[mask]
            metrics.add(cross_entropy(chosen, targets, reduction="none"), targets, chosen.argmax(-1) == targets,
                        token_bytes.to(device))
    model.train(was_training)
    if d.world > 1:
        totals = torch.tensor([metrics.nats, metrics.tokens, metrics.bytes, metrics.correct], dtype=torch.float64,
                              device=device)
        all_reduce_sum(totals, d)
        metrics = Metrics(float(totals[0]), int(totals[1]), int(totals[2]), int(totals[3]))
    return metrics


@dataclass
class Answer:
    """A greedy answer to a task."""

    text: str
    """What the model wrote before ending its turn (or all of it, when it did not)."""
    ended: bool
    """Whether it ended its turn (a stop id: the end of a turn or of the text) within the token budget."""
    right: bool
    """Whether the task's verifier accepts the text."""


@torch.no_grad()
def answer(model: torch.nn.Module, tokenizer: tok.Tokenizer, task: Task, max_new_tokens: int = ANSWER_TOKENS
           ) -> Answer:
    """The model's greedy answer (temperature 0, the KV cache) to a task, stopping at the end of its turn."""
    stops = set(tokenizer.stop_ids)
    tokens, ended = [], False
    for token in generate(model, task.ids, max_new_tokens, temperature=0.0):
        if token in stops:
            ended = True
            break
        tokens.append(token)
    text = tokenizer.decode(tokens)
    return Answer(text, ended, synthetic.verify(task.prompt, text))


def answer_tasks(model: torch.nn.Module, tokenizer: tok.Tokenizer, tasks: Sequence[Task],
                 max_new_tokens: int = ANSWER_TOKENS) -> dict:
    """Greedy answers to the tasks, one at a time with the KV cache, in eval mode (no random numbers drawn):
    {"exact_match": {skill: share right}, "ended_turn": share of answers that ended their turn}."""
    was_training = model.training
    model.eval()
    right: Counter = Counter()
    asked: Counter = Counter()
    ended = 0
    for task in tasks:
        result = answer(model, tokenizer, task, max_new_tokens)
        asked[task.skill] += 1
        right[task.skill] += result.right
        ended += result.ended
    model.train(was_training)
    return {"exact_match": {skill: right[skill] / asked[skill] for skill in sorted(asked)},
            "ended_turn": ended / max(1, len(tasks))}


# ---------------------------------------------------------------------------------------------------------------
# lmlab eval


def pad_id(tokenizer: tok.Tokenizer) -> int:
    """The id that fills the end of a block of packed conversations (never trained, never attended to from a
    conversation): the end of text."""
    return tokenizer.special_tokens.get(tok.ENDOFTEXT, 0)


def evaluates_conversations(config: TrainConfig, data: Optional[str]) -> bool:
    """Whether `lmlab eval` of a run measures conversations: a fine-tuned run (its stage is sft), on its own held-out
    conversations (or prompt-completion pairs) or --data's conversations (a text --data measures text, as for any
    run); a chat model of --stage rl on its task's held-out conversations (synthetic:chat) or --data's."""
    if not data:
        return config.chat_model
    return config.chat_model and is_conversations(data)


def evaluate_run(run, data: Optional[str], batch_size: int = 32, trust: bool = False) -> dict:
    """A fine-tuned run (run.load_run's) on conversations: --data's (every conversation of a file, or the
    held-out split of synthetic:chat), else the run's own held-out ones (its data, split as training split it, or
    an rl run's task's; a path from its config is read only as rundir.check_data_paths allows), or its own held-out
    prompt-completion pairs. The masked loss, bits/byte and accuracy of what the assistant writes, and, where there
    is a verifier, the exact match by skill and the share of ended turns."""
    tokenizer, model = run.tokenizer, run.model
    block = model.cfg.block_size
    saved = run.config
    if not data and saved.stage == "rl":  # its task's held-out conversations
        data = saved.rl.task
    if data and not synthetic.is_chat(data):
        conversations, source = chat.read_conversations(data), data
    else:
        if not data:
            run.run.check_data_paths([("--data", saved.data.data), ("--val-data", saved.data.val_data)], "lmlab eval",
                                     trust)
        source = data or saved.data.val_data or saved.data.data
        conversations = read_chat_data(data or saved.data.data, None if data else saved.data.val_data,
                                       saved.data.val_fraction, saved.seed).val
    if conversations and isinstance(conversations[0], Completion):  # TRL's prompt-completion pairs: plain text
        rendered, tasks = [r for r in (encode_completion(tokenizer, p) for p in conversations)
                           if len(r.ids) <= block + 1], []
    else:
        chat.check_characters(tokenizer, conversations, source)
        done = chat.render_all(tokenizer, conversations, block + 1)
        rendered = done.rendered
        tasks = choose_tasks(tokenizer, [conversations[i] for i in done.kept], block)
    if not rendered:
        raise LmlabError(f"none of the conversations of {source} fits the context of {block} tokens")
    m = evaluate_chat(model, validation_blocks(rendered, block, 0, pad_id(tokenizer)),
                      torch.from_numpy(tokenizer.byte_lengths()), batch_size)
    result = {"source": source, "conversations": len(rendered), "loss": m.loss,
              "bits_per_byte": m.bits_per_byte, "perplexity": m.perplexity, "accuracy": m.accuracy,
              "tokens": m.tokens}
    return {**result, **(answer_tasks(model, tokenizer, tasks) if tasks else {}), "answers": len(tasks)}


def describe_eval(result: dict, as_json: bool = False) -> str:
    """evaluate_run's result as lines for a terminal, or as one JSON object."""
    if as_json:
        return json.dumps(result)
    lines = [f"{result['conversations']:,} conversations of {result['source']}: {result['tokens']:,} tokens that "
             f"the assistant writes predicted",
             f"  masked loss {result['loss']:.4f} nats/token, {result['bits_per_byte']:.4f} bits/byte, accuracy "
             f"{result['accuracy']:.2%} (top-1)"]
    if result["answers"]:
        lines.append(f"  {result['answers']} held-out prompts answered greedily: exact match "
                     + ", ".join(f"{k} {v:.0%}" for k, v in result["exact_match"].items())
                     + f"; {result['ended_turn']:.0%} ended their turn")
    return "\n".join(lines)

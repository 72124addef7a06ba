"""Preference tuning (`lmlab train --stage dpo`): Direct Preference Optimization of the --init-from model on pairs of
completions, one preferred to the other. The loop, the run folder, checkpoints, resume and logs are train.py's; this
module holds what differs:

- `read_pairs`: a .jsonl file in TRL's preference format, {"prompt", "chosen", "rejected"} per line, all three texts
  (the prompt continued by a completion) or all message lists (the prompt's messages end with the user's; chosen and
  rejected hold the assistant's answer, rendered through the run's chat template as --stage sft renders). The whole
  file is checked first: a malformed line is one error naming it, and nothing of the file is used.
- `encode`: each completion after its prompt as token ids, with the mask of its completion's tokens (the prompt never
  counts); pairs longer than the context are left out and counted.
- the reference: the base model's summed log-probabilities of every completion, computed once, without gradients,
  before the first step and kept in the run folder (rundir.REFERENCE) with a hash of the pairs they belong to, so
  that a resumed run compares with the same numbers, and a changed data file is refused.
- `PairSampler`: each step draws pairs with a seeded generator (its state is the whole state, saved in checkpoints)
  and pads chosen and rejected rows of a micro-batch to its longest; `objective`, the step's DPO loss
  (loss.dpo_loss) and what is logged with it; `evaluate_pairs`, the same on the held-out pairs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from . import chat, rundir, synthetic
from . import tokenizer as tok
from .common import LmlabError
from .config import TrainConfig
from .data import hold_out
from .evaluate import autocast_context
from .loss import LossConfig, Metrics, completion_logprob, cross_entropy, dpo_loss
from .sft import pad_id

STATS = ("chosen_reward", "rejected_reward", "margin", "preference_accuracy", "chosen_logp", "rejected_logp")
"""What a step logs besides its loss (the means over its pairs), and validation with val_ before each."""
KEYS = ("prompt", "chosen", "rejected")


@dataclass
class Pair:
    """A prompt and two completions of it, `chosen` preferred to `rejected`: three texts, or message lists."""

    prompt: Any
    chosen: Any
    rejected: Any
    where: str = ""

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def check_pair(obj: Any, where: str = "") -> Pair:
    """A line's object as a Pair, or one LmlabError saying what is wrong with it."""
    if not isinstance(obj, dict) or any(k not in obj for k in KEYS):
        missing = [k for k in KEYS if not isinstance(obj, dict) or k not in obj]
        raise LmlabError(f"no {', '.join(map(repr, missing))}; a line is {{\"prompt\", \"chosen\", \"rejected\"}} "
                         f"(texts or message lists)")
    prompt, chosen, rejected = (obj[k] for k in KEYS)
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        for key in KEYS:
            if not obj[key]:
                raise LmlabError(f"{key} is empty; a completion needs a prompt to follow and text of its own")
            if len(obj[key]) > chat.MAX_CONTENT_CHARS:
                raise LmlabError(f"{key} has {len(obj[key]):,} characters, more than {chat.MAX_CONTENT_CHARS:,}")
        return Pair(prompt, chosen, rejected, where)
    if not all(isinstance(v, list) for v in (prompt, chosen, rejected)):
        kind = {str: "a string", list: "a list"}
        kinds = ", ".join(f"{k} {kind.get(type(obj[k]), 'neither')}" for k in KEYS)
        raise LmlabError(f"{kinds}: a line holds three texts or three message lists")
    try:
        prompt = chat.check_messages(prompt, last="user")
    except LmlabError as e:
        raise LmlabError(f"prompt: {e}") from None
    answers = []
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or not isinstance(answer[0], dict) or answer[0].get("role") != "assistant":
            raise LmlabError(f"{key} must start with the assistant's message that answers the prompt")
        try:
            answers.append(chat.check_messages(prompt + answer)[len(prompt):])
        except LmlabError as e:
            raise LmlabError(f"{key} after the prompt: {e}") from None
    return Pair(prompt, *answers, where=where)


def check_config(cfg: TrainConfig) -> None:
    """Refuse what --stage dpo cannot train: its data is preference pairs, its loss DPO's alone."""
    for option, source in (("--data", cfg.data.data), ("--val-data", cfg.data.val_data)):
        if source and not str(source).endswith(".jsonl"):
            raise LmlabError(f"--stage dpo trains on preference pairs: {option} must be a .jsonl file of "
                             f"{{\"prompt\", \"chosen\", \"rejected\"}} lines, not {source}")
    loss = cfg.loss
    if loss.objective != "cross_entropy" or loss.z_loss or loss.label_smoothing:
        raise LmlabError("--stage dpo trains the DPO loss: --objective, --z-loss and --label-smoothing do not apply")


def read_pairs(path: str) -> list[Pair]:
    """Every pair of a .jsonl file (check_pair), the file checked whole; one kind of line (texts or messages)."""
    from pathlib import Path

    if not str(path).endswith(".jsonl") or not Path(path).is_file():
        raise LmlabError(f"--stage dpo reads preference pairs from a .jsonl file of {{\"prompt\", \"chosen\", "
                         f"\"rejected\"}} lines: {path} is {'not a .jsonl file' if Path(path).is_file() else 'missing'}")
    pairs = chat.read_jsonl_records(Path(path), check_pair, "preference pairs")
    mixed = next((p for p in pairs if p.conversational != pairs[0].conversational), None)
    if mixed is not None:
        raise LmlabError(f"{path}: {mixed.where} holds {'messages' if mixed.conversational else 'texts'} where "
                         f"{pairs[0].where} holds {'messages' if pairs[0].conversational else 'texts'}; a file holds "
                         f"one kind")
    return pairs


@dataclass
class PairSplits:
    train: list[Pair]
    val: list[Pair]
    source: str


def load_pairs(src: str, val_data: Optional[str], val_fraction: float, seed: int) -> PairSplits:
    """The pairs to train on and those held out: val_data's, else a val_fraction of src's drawn with `seed` (as
    --stage sft holds out conversations)."""
    pairs = read_pairs(src)
    if val_data:
        return PairSplits(pairs, read_pairs(val_data), src)
    return PairSplits(*hold_out(pairs, val_fraction, seed, src, "preference pair"), src)


# ---------------------------------------------------------------------------------------------------------------
# Token ids


@dataclass
class Encoded:
    """A pair as token ids: each completion after its prompt, and the mask of the completion's tokens."""

    ids: tuple[np.ndarray, np.ndarray]
    """(chosen, rejected): (T,) int64, the prompt's tokens then the completion's."""
    mask: tuple[np.ndarray, np.ndarray]
    """(T,) bool: mask[t] says ids[t] is the completion's, so that the log-probability of predicting it counts."""


def encode_completion(tokenizer: tok.Tokenizer, pair: Pair, completion: Any) -> tuple[np.ndarray, np.ndarray]:
    """A completion after its prompt: (ids, completion mask). Texts are encoded apart (prompt, then completion); a
    conversation is rendered whole with the chat template, its completion's tokens being those the assistant writes
    after the prompt rendered with the generation prompt."""
    if not pair.conversational:
        prompt, text = tokenizer.encode_array(pair.prompt), tokenizer.encode_array(completion)
        return (np.concatenate([prompt, text]).astype(np.int64),
                np.concatenate([np.zeros(len(prompt), bool), np.ones(len(text), bool)]))
    head = chat.render(tokenizer, pair.prompt, add_generation_prompt=True).ids
    full = chat.render(tokenizer, pair.prompt + completion)
    if not np.array_equal(full.ids[:len(head)], head):
        raise LmlabError("the chat template renders the prompt differently once an answer follows it, so lmlab "
                         "cannot tell the completion's tokens apart")
    mask = full.mask.copy()
    mask[:len(head)] = False
    return full.ids, mask


@dataclass
class PairData:
    """The pairs of a DPO run, encoded for its tokenizer and context, and the reference's log-probabilities."""

    train: list[Encoded]
    val: list[Encoded]
    prompts: list[list[int]]
    """A few held-out prompts (as the model continues them): the probe's."""
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    """{"train", "val"}: (N, 2) float64, the reference's summed log-probabilities of (chosen, rejected)."""
    chat: bool = False
    """Whether the pairs are conversations (the run then answers turns, as an sft run does)."""

    def stream(self, split: str) -> np.ndarray:
        """A split's completions with their prompts, chosen then rejected, one after another (what a text run's
        split is: passes over it are counted in tokens)."""
        return np.concatenate([ids for e in (self.train if split == "train" else self.val) for ids in e.ids]
                              ).astype(np.int64)

    @property
    def pair_tokens(self) -> float:
        """The tokens of a training pair (chosen and rejected, with their prompts), on average."""
        return float(np.mean([len(e.ids[0]) + len(e.ids[1]) for e in self.train]))

    def reference_sha256(self) -> str:
        """A hash of the reference's log-probabilities: which reference a checkpoint was trained against."""
        return hashlib.sha256(b"".join(np.ascontiguousarray(self.reference[k], np.float64).tobytes()
                                       for k in ("train", "val"))).hexdigest()

    def fingerprint(self) -> str:
        """A hash of every pair's ids and masks, both splits: what the reference belongs to."""
        h = hashlib.sha256()
        for e in self.train + [None] + self.val:  # None: where the splits part
            for a in (e.ids + e.mask) if e is not None else (np.zeros(1, np.int8),):
                h.update(np.int64(len(a)).tobytes() + a.tobytes())
        return h.hexdigest()


def encode(splits: PairSplits, val_data: Optional[str], tokenizer: tok.Tokenizer, block_size: int,
           say: Callable[[str], None]) -> PairData:
    """Every pair encoded (encode_completion); pairs either of whose completions does not fit block_size + 1 tokens
    are left out and said."""
    if splits.train[0].conversational and tokenizer.chat_template is None:
        raise LmlabError(f"the pairs are conversations, but this {tokenizer.kind} tokenizer has no chat template")
    out = []
    for name, pairs, source in (("training", splits.train, splits.source),
                                ("held-out", splits.val, val_data or f"{splits.source} (held out)")):
        texts = [chat.Conversation([{"role": "user", "content": m["content"] if isinstance(m, dict) else m}
                                    for m in ([p.prompt, p.chosen, p.rejected] if not p.conversational
                                              else p.prompt + p.chosen + p.rejected)], where=p.where) for p in pairs]
        chat.check_characters(tokenizer, texts, source)
        encoded, left_out = [], []
        for pair in pairs:
            try:
                done = [encode_completion(tokenizer, pair, c) for c in (pair.chosen, pair.rejected)]
            except LmlabError as e:
                raise LmlabError(f"{source}: {pair.where}: {e}") from None
            if max(len(ids) for ids, _ in done) > block_size + 1 or not all(m.any() for _, m in done):
                left_out.append(pair.where)
                continue
            encoded.append(Encoded((done[0][0], done[1][0]), (done[0][1], done[1][1])))
        say(f"{name} pairs of {source}: {len(encoded):,} of {len(pairs):,} fit {block_size + 1:,} tokens"
            + (f"; {len(left_out):,} left out (the first: {left_out[0]})" if left_out else ""))
        if not encoded:
            raise LmlabError(f"none of the {name} pairs fits a context of {block_size} tokens")
        out.append(encoded)
    prompts = [e.ids[0][: int(np.argmax(e.mask[0]))].tolist() for e in out[1][:3]]
    return PairData(out[0], out[1], prompts, chat=splits.train[0].conversational)


# ---------------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class PairBatch:
    """A micro-batch of B pairs: rows 0..B-1 the chosen completions, B..2B-1 the rejected ones of the same pairs."""

    x: torch.Tensor
    """(2B, T) input ids, padded at the end."""
    y: torch.Tensor
    """(2B, T) target ids: x shifted by one."""
    mask: torch.Tensor
    """(2B, T) bool: the targets that are completion tokens (their log-probabilities are summed)."""
    reference: torch.Tensor
    """(2B,) float32: the reference's summed log-probability of each row's completion."""


def to_batch(pairs: Sequence[Encoded], reference: np.ndarray, pad_id: int, device: torch.device) -> PairBatch:
    """Pairs (and their rows of the reference, (B, 2)) as a PairBatch, every row padded to the longest."""
    rows = [e.ids[0] for e in pairs] + [e.ids[1] for e in pairs]
    masks = [e.mask[0] for e in pairs] + [e.mask[1] for e in pairs]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    trained = np.zeros((len(rows), width), dtype=bool)
    for r, (row, mask) in enumerate(zip(rows, masks)):
        ids[r, :len(row)], trained[r, :len(row)] = row, mask
    ref = np.concatenate([reference[:, 0], reference[:, 1]]).astype(np.float32)
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (ids[:, :-1], ids[:, 1:], trained[:, 1:], ref)]
    return PairBatch(*(t.to(device) for t in tensors))


class PairSampler:
    """Training micro-batches of pairs, drawn by a seeded generator (the interface of data.BatchSampler): each
    optimizer step draws its global batch (batch_size x grad_accum x world pairs) uniformly with replacement, and
    micro-step a of rank r takes chunk a * world + r. The generator's state is the whole state."""

    def __init__(self, data: PairData, batch_size: int, seed: int, device: torch.device, grad_accum: int = 1,
                 rank: int = 0, world: int = 1, pad_id: int = 0):
        self.data, self.batch_size, self.grad_accum, self.rank, self.world = data, batch_size, grad_accum, rank, world
        self.device, self.pad_id = device, pad_id
        self.generator = torch.Generator().manual_seed(seed)
        self._step: list[int] = []
        self._micro = 0

    def next(self) -> PairBatch:
        if self._micro == 0:
            blocks = self.batch_size * self.grad_accum * self.world
            self._step = torch.randint(len(self.data.train), (blocks,), generator=self.generator).tolist()
        chunk = self._micro * self.world + self.rank
        chosen = self._step[chunk * self.batch_size:(chunk + 1) * self.batch_size]
        self._micro = (self._micro + 1) % self.grad_accum
        return to_batch([self.data.train[i] for i in chosen], self.data.reference["train"][chosen], self.pad_id,
                        self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self._micro = 0  # checkpoints are taken between optimizer steps


def pair_losses(logits: torch.Tensor, batch: PairBatch, beta: float) -> tuple[torch.Tensor, ...]:
    """(loss, chosen reward, rejected reward, policy log-probs (chosen, rejected)), each per pair (B,)."""
    logps = completion_logprob(logits, batch.y, batch.mask)  # (2B,)
    reference = batch.reference.to(logps.dtype)
    n = len(logps) // 2
    loss, chosen, rejected = dpo_loss(logps[:n], logps[n:], reference[:n], reference[n:], beta)
    return loss, chosen, rejected, logps[:n], logps[n:]


def objective(logits: torch.Tensor, batch: PairBatch, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's loss on a micro-batch (the mean DPO loss of its pairs) and, detached, the means of STATS."""
    loss, chosen, rejected, logp_chosen, logp_rejected = pair_losses(logits, batch, cfg.dpo_beta)
    margin = chosen - rejected
    stats = torch.stack([chosen.mean(), rejected.mean(), margin.mean(), (margin > 0).float().mean(),
                         logp_chosen.mean(), logp_rejected.mean()])
    return loss.mean(), stats.detach().double()


def named(stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
    return {prefix + name: float(v) for name, v in zip(STATS, stats.tolist())}


# ---------------------------------------------------------------------------------------------------------------
# The reference and validation


@torch.no_grad()
def logprobs(model: torch.nn.Module, pairs: Sequence[Encoded], batch_size: int, dtype: torch.dtype,
             pad_id: int = 0) -> np.ndarray:
    """The model's summed completion log-probabilities of every pair, (N, 2) float64 (chosen, rejected), in eval
    mode (no dropout, no random numbers drawn)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = to_batch(chunk, np.zeros((len(chunk), 2)), pad_id, device)
        with autocast_context(device, dtype):
            logits = model(batch.x)
        logps = completion_logprob(logits, batch.y, batch.mask).double().cpu().numpy()
        out.append(np.stack([logps[:len(chunk)], logps[len(chunk):]], axis=1))
    model.train(was_training)
    return np.concatenate(out)


def reference(model: torch.nn.Module, data: PairData, cfg: TrainConfig, run_dir, resuming: bool,
              dtype: torch.dtype, pad_id: int, main: bool, say: Callable[[str], None]) -> None:
    """Fill data.reference: from the run folder on resume (refused when the pairs are no longer those it belongs
    to), else the base model's (model, as --init-from loaded it), written to the run folder by rank 0."""
    if resuming:
        return load_reference(data, run_dir, cfg.data.data)
    data.reference = {"train": logprobs(model, data.train, cfg.batch_size, dtype, pad_id),
                      "val": logprobs(model, data.val, cfg.batch_size, dtype, pad_id)}
    prefers = float(np.mean(data.reference["val"][:, 0] > data.reference["val"][:, 1]))
    say(f"reference: the base's log-probabilities of {len(data.train) + len(data.val):,} pairs' completions; it "
        f"already gives the chosen one more probability in {prefers:.0%} of the held-out pairs")
    if main:
        rundir.write_json(run_dir, rundir.REFERENCE, {
            "init_from": cfg.init_from, "pairs_sha256": data.fingerprint(),
            "train": data.reference["train"].tolist(), "val": data.reference["val"].tolist()})


def load_reference(data: PairData, run_dir, source: str) -> None:
    """Fill data.reference from the run folder, refusing pairs other than those it belongs to."""
    saved = rundir.read_json(run_dir, rundir.REFERENCE)
    if not isinstance(saved, dict) or saved.get("pairs_sha256") != data.fingerprint():
        raise LmlabError(f"the preference pairs of {source} are not those the run in {run_dir} started with (its "
                         f"{rundir.REFERENCE} belongs to other pairs)")
    try:
        data.reference = {k: np.asarray(saved[k], dtype=np.float64).reshape(len(getattr(data, k)), 2)
                          for k in ("train", "val")}
    except (KeyError, TypeError, ValueError):
        raise LmlabError(f"{run_dir}/{rundir.REFERENCE} is malformed") from None


REFERENCE_KEY = "reference_sha256"  # in a checkpoint's counters: the reference its steps compared with


def check_reference(data: PairData, counters: dict, where) -> None:
    """Refuse to go on from a checkpoint trained against another reference than the run folder's."""
    if counters.get(REFERENCE_KEY) != data.reference_sha256():
        raise LmlabError(f"{where} was trained against another reference than the run's {rundir.REFERENCE} (it was "
                         f"changed or replaced); start a new run")


@dataclass
class PreferenceMetrics(Metrics):
    """Validation of a DPO run: the DPO loss (`loss`, what val_loss holds and the best checkpoint follows) and the
    STATS of the held-out pairs; the token totals (bits/byte, accuracy) are those of the chosen completions."""

    dpo_nats: float = 0.0
    pairs: int = 0
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.dpo_nats / max(self.pairs, 1)

    @property
    def perplexity(self) -> float:
        return float(np.exp(min(self.nats / max(self.tokens, 1), 700.0)))

    def record(self) -> dict[str, Any]:
        return {**self.stats, "val_pairs": self.pairs}


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, data: PairData, beta: float, token_bytes: torch.Tensor,
                   batch_size: int = 32, dtype: torch.dtype = torch.float32, pad_id: int = 0) -> PreferenceMetrics:
    """The held-out pairs, in eval mode: the mean DPO loss against the reference, the means of STATS, and the
    cross-entropy of the chosen completions' tokens. Every process scores every pair (the held-out pairs are few,
    and each forward stays collective under FSDP)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    m, sums = PreferenceMetrics(), torch.zeros(len(STATS), dtype=torch.float64)
    for start in range(0, len(data.val), batch_size):
        chunk = data.val[start:start + batch_size]
        batch = to_batch(chunk, data.reference["val"][start:start + batch_size], pad_id, device)
        with autocast_context(device, dtype):
            logits = model(batch.x)
        loss, stats = objective(logits, batch, LossConfig(dpo_beta=beta))
        m.dpo_nats += float(loss) * len(chunk)
        m.pairs += len(chunk)
        sums += stats.cpu() * len(chunk)
        n = len(chunk)
        chosen, targets = logits[:n][batch.mask[:n]], batch.y[:n][batch.mask[:n]]  # (N, V), (N,)
        m.add(cross_entropy(chosen, targets, reduction="none"), targets, chosen.argmax(-1) == targets,
              token_bytes.to(device))
    model.train(was_training)
    m.stats = named(sums / max(m.pairs, 1), "val_")
    return m


def describe(m: PreferenceMetrics) -> str:
    return f"preference accuracy {m.stats['val_preference_accuracy']:.1%}, margin {m.stats['val_margin']:.3f}"


# ---------------------------------------------------------------------------------------------------------------
# lmlab eval


def evaluates_pairs(config: TrainConfig, data: Optional[str]) -> bool:
    """Whether `lmlab eval` of a run measures its held-out preference pairs: a DPO run without --data (a text --data
    measures text, as for any run)."""
    return config.stage == "dpo" and not data


def evaluate_run(run, batch_size: int = 32, trust: bool = False) -> dict:
    """A DPO run (run.load_run's) on its held-out pairs, against the reference kept in its folder: the DPO loss, the
    STATS and the cross-entropy of the chosen completions (its data paths read only as rundir.check_data_paths
    allows)."""
    saved = run.config
    run.run.check_data_paths([("--data", saved.data.data), ("--val-data", saved.data.val_data)], "lmlab eval", trust)
    splits = load_pairs(saved.data.data, saved.data.val_data, saved.data.val_fraction, saved.seed)
    data = encode(splits, saved.data.val_data, run.tokenizer, run.model.cfg.block_size, lambda m: None)
    load_reference(data, run.run.path, saved.data.data)
    m = evaluate_pairs(run.model, data, saved.loss.dpo_beta, torch.from_numpy(run.tokenizer.byte_lengths()),
                       batch_size, pad_id=pad_id(run.tokenizer))
    return {"source": saved.data.val_data or f"{saved.data.data} (held out)", "pairs": m.pairs, "loss": m.loss,
            **{k[len("val_"):]: v for k, v in m.stats.items()}, "chosen_bits_per_byte": m.bits_per_byte}


def describe_eval(result: dict, as_json: bool = False) -> str:
    """evaluate_run's result as lines for a terminal, or as one JSON object."""
    if as_json:
        return json.dumps(result)
    return (f"{result['pairs']:,} preference pairs of {result['source']}, against the reference (the base):\n"
            f"  DPO loss {result['loss']:.4f}, preference accuracy {result['preference_accuracy']:.1%}, margin "
            f"{result['margin']:.4f} (rewards: chosen {result['chosen_reward']:.4f}, rejected "
            f"{result['rejected_reward']:.4f})\n  log-probabilities: chosen {result['chosen_logp']:.3f}, rejected "
            f"{result['rejected_logp']:.3f}; the chosen completions' {result['chosen_bits_per_byte']:.4f} bits/byte")


def chat_pairs(seed: int, split: str, count: int) -> list[Pair]:
    """synthetic:chat prompts, each with its right answer chosen and a wrong one rejected (the answer to the next
    prompt of the same skill whose answer differs): conversational pairs whose preference a verifier knows."""
    tasks = synthetic.chat_tasks(seed, split, count + 64)
    pairs = []
    for i, task in enumerate(tasks[:count]):
        wrong = next((t.messages[-1] for t in tasks[i + 1:] + tasks[:i]
                      if t.skill == task.skill and t.messages[-1]["content"] != task.messages[-1]["content"]), None)
        if wrong is not None:
            pairs.append(Pair(task.messages[:-1], [task.messages[-1]], [wrong], f"{split} task {i + 1}"))
    return pairs


def pairs_json(pairs: Sequence[Pair]) -> str:
    """Pairs as the lines of a .jsonl file (read_pairs reads them back)."""
    return "".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                   for p in pairs)

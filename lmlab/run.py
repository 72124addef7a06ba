"""A run folder, opened: the one way lmlab reads a run.

`Run(path)` owns what training wrote there: its config (a TrainConfig, parsed once), its status, its metric records
as dataclasses (one per kind: TrainRecord, EvalRecord, RollbackRecord), its probes, inside and telemetry records,
samples, weight snapshots and checkpoints (objects with a .step, newest first), and loading its model (`Run.load`).
Report, serve, the experiments, bench, the CLI and the training loop read runs through it; rundir spells the
folder's names and opens its files safely (no links, bounded JSON, well-formed records only); checkpoint reads and
writes one checkpoint folder.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch

from . import rundir
from . import tokenizer as tok
from .checkpoint import (Checkpoint, checkpoint_dirs, checkpoint_path, good_checkpoints, load_dcp_trusting_pickle, load_newest,
                         save_single, verify_checkpoint)
from .common import LmlabError, check_new_folder
from .config import TrainConfig
from .model import build_model, check_fits


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The records of metrics.jsonl, one dataclass per kind. rundir.well_formed has checked the types of every field
# present; a field missing from a record (an older run, a kind of step) is its default here.


@dataclass(frozen=True)
class TrainRecord:
    """One training step."""

    step: int
    train_loss: float  # NaN for a skipped (non-finite) step
    tokens: int = 0
    lr: Optional[float] = None
    grad_norm: Optional[float] = None
    tokens_per_s: Optional[float] = None
    elapsed_s: Optional[float] = None
    skipped: bool = False
    skipped_total: Optional[int] = None
    clipped: bool = False
    spike_z: Optional[float] = None  # how far the loss jumped above its recent mean, in standard deviations
    # --stage dpo (train_loss is the DPO loss): the means over the step's pairs of the implicit rewards beta x (log
    # pi - log ref) of the chosen and the rejected completion, their margin, the share of pairs whose margin is > 0,
    # and the policy's summed log-probabilities of the completions
    chosen_reward: Optional[float] = None
    rejected_reward: Optional[float] = None
    margin: Optional[float] = None
    preference_accuracy: Optional[float] = None
    chosen_logp: Optional[float] = None
    rejected_logp: Optional[float] = None
    # --stage rl: the step's completions (rl.RolloutSampler.step_record)
    reward: Optional[float] = None  # mean reward
    pass_at_1: Optional[float] = None  # share of completions rewarded above 0
    pass_at_g: Optional[float] = None  # share of prompts with a completion rewarded above 0 in their group
    kl: Optional[float] = None  # k3 estimate of KL(policy || reference) per completion token (with --kl-beta > 0)
    entropy: Optional[float] = None  # of the policy, nats per completion token
    completion_tokens: Optional[float] = None  # mean length of a completion
    mixed_fraction: Optional[float] = None  # share of the groups drawn whose rewards are not all equal
    kept_fraction: Optional[float] = None  # share of the groups drawn that were trained (--rl-oversample)
    clip_fraction: Optional[float] = None  # share of completion tokens whose ratio was clipped
    generation_s: Optional[float] = None  # where the step's time went: sampling the completions,
    scoring_s: Optional[float] = None  # scoring them,
    update_s: Optional[float] = None  # forward, backward and the optimizer step


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation on the validation text (pretraining), the held-out conversations (sft) or pairs (dpo)."""

    step: int
    val_loss: float
    tokens: int = 0
    elapsed_s: Optional[float] = None
    val_bits_per_byte: Optional[float] = None
    val_accuracy: Optional[float] = None
    val_perplexity: Optional[float] = None
    val_tokens: Optional[int] = None
    val_stride: Optional[int] = None  # None for conversations (whole ones, not windows of a stream)
    passes: Optional[float] = None
    best: bool = False
    overfitting: Optional[int] = None  # evaluations in a row whose loss rose while the training loss fell
    exact_match: dict[str, float] = field(default_factory=dict)  # by skill, sft runs with verifiers
    ended_turn: Optional[float] = None
    # --stage dpo: val_loss is the DPO loss of the held-out pairs, and these their TrainRecord measures
    val_chosen_reward: Optional[float] = None
    val_rejected_reward: Optional[float] = None
    val_margin: Optional[float] = None
    val_preference_accuracy: Optional[float] = None
    val_chosen_logp: Optional[float] = None
    val_rejected_logp: Optional[float] = None
    val_pairs: Optional[int] = None
    heldout_reward: Optional[float] = None  # --stage rl: mean reward of greedy completions of held-out prompts
    heldout_pass_at_1: Optional[float] = None  # and the share of them rewarded above 0

    @property
    def finite(self) -> bool:
        return math.isfinite(self.val_loss)


@dataclass(frozen=True)
class RollbackRecord:
    """Training went back to a checkpoint after too many non-finite steps, with a smaller learning rate."""

    step: int
    rollback: int  # how many rollbacks so far
    lr_scale: float = 1.0


MetricRecord = Union[TrainRecord, EvalRecord, RollbackRecord]


def _build(cls, record: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in record.items() if k in names})


def metric_record(record: dict) -> Optional[MetricRecord]:
    """The typed record of one line of metrics.jsonl (rundir.well_formed's), by the field that only its kind
    holds; None for a line of no known kind."""
    if "rollback" in record:
        return _build(RollbackRecord, record)
    if "val_loss" in record:
        return _build(EvalRecord, record)
    if "train_loss" in record:
        return _build(TrainRecord, record)
    return None


@dataclass
class Metrics:
    """The records of metrics.jsonl by kind, each list in the order training wrote it."""

    train: list[TrainRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)
    rollbacks: list[RollbackRecord] = field(default_factory=list)

    @classmethod
    def of(cls, records: list[dict]) -> "Metrics":
        metrics = cls()
        for record in map(metric_record, records):
            if isinstance(record, TrainRecord):
                metrics.train.append(record)
            elif isinstance(record, EvalRecord):
                metrics.evals.append(record)
            elif isinstance(record, RollbackRecord):
                metrics.rollbacks.append(record)
        return metrics

    def best_eval(self) -> Optional[EvalRecord]:
        """The evaluation with the lowest finite validation loss (an rl run's: the highest held-out reward), the
        later of equals, or None."""
        rewarded = [r for r in self.evals if r.heldout_reward is not None]
        if rewarded:
            return max(reversed(rewarded), key=lambda r: r.heldout_reward)
        finite = [r for r in self.evals if r.finite]
        return min(reversed(finite), key=lambda r: r.val_loss) if finite else None


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Snapshot:
    """The weights at a step, saved for the landscape's trajectory (RUN/trajectory)."""

    step: int
    path: Path

    def read(self) -> bytes:
        """Its safetensors bytes, read without following a link."""
        return rundir.read_bytes(self.path.parent.parent, Path(rundir.TRAJECTORY, self.path.name))


@dataclass(frozen=True)
class CheckpointFolder:
    """A checkpoint folder of the run (RUN/checkpoints/step_N), listed, not yet verified."""

    step: int
    path: Path

    def verify(self) -> dict:
        """Its state.json once every file matches its hash (checkpoint.verify_checkpoint); LmlabError otherwise."""
        return verify_checkpoint(self.path)


class Run:
    """A run folder. Nothing is read until asked for, and the config only once; `Run.open` checks at once that the
    folder is a run with a well-formed config."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        run = cls(path)
        run.config  # noqa: B018 - read and checked now, so a folder that is no run is refused at once
        return run

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # -- the config ------------------------------------------------------------------------------------------------

    @cached_property
    def config_json(self) -> dict:
        """config.json as written: the TrainConfig's fields and the run's own (vocab_size, tokenizer_fingerprint,
        run_id, schema_version, lmlab_version)."""
        path = self.path
        if not path.is_dir():
            raise LmlabError(f"no run at {path} (not a directory)")
        if not rundir.exists(path, rundir.CONFIG):
            raise LmlabError(f"{path} is not an lmlab run (no {rundir.CONFIG})")
        config = rundir.read_json(path, rundir.CONFIG)
        if not isinstance(config, dict):
            raise LmlabError(f"{path / rundir.CONFIG} is malformed: not a JSON object")
        return config

    @cached_property
    def config(self) -> TrainConfig:
        """The run's TrainConfig, checked field by field; a malformed one is one LmlabError."""
        try:
            return TrainConfig.from_json(self.config_json)
        except LmlabError as e:
            raise LmlabError(f"{self.path / rundir.CONFIG} is malformed: {e}") from None

    def _meta(self, key: str, kind: type) -> Any:
        value = self.config_json.get(key)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    @property
    def stage(self) -> str:
        """"pretrain" (continuing text) or "sft" (answering in conversations)."""
        return self.config.stage

    @property
    def is_chat(self) -> bool:
        """Whether the run answers in conversations (a chat model): what training recorded, else (a run from before
        the record) what its config says (TrainConfig.chat_model)."""
        recorded = self.config_json.get(rundir.CHAT)
        return recorded if isinstance(recorded, bool) else self.config.chat_model

    @property
    def vocab_size(self) -> Optional[int]:
        return self._meta("vocab_size", int)

    @property
    def run_id(self) -> Optional[str]:
        """The random id training wrote into config.json (rundir.sources_made_here keys on it)."""
        return self._meta(rundir.RUN_ID, str)

    @property
    def created(self) -> float:
        return rundir.created(self.path)

    def check_data_paths(self, sources: list[tuple[str, Optional[str]]], command: str, trust: bool = False) -> None:
        """Refuse to read a corpus path its config names unless lmlab wrote it there (rundir.check_data_paths)."""
        rundir.check_data_paths(self.path, self.run_id, sources, command, trust)

    # -- what training wrote ---------------------------------------------------------------------------------------

    def status(self) -> dict:
        """rundir.run_status: running, finished, interrupted, failed (a crashed writer reads failed) or unknown."""
        return rundir.run_status(self.path)

    def metrics(self) -> Metrics:
        return Metrics.of(rundir.read_jsonl(self.path, rundir.METRICS))

    def probes(self) -> list[dict]:
        """{"step", "probes": [{"prompt", "continuation", "top": [[token, p], ...]}]} per evaluation."""
        return rundir.read_jsonl(self.path, rundir.PROBES)

    def telemetry(self) -> list[dict]:
        """{"step", "grad_norm": {layer: x}, "update_ratio": {layer: x}} per watched step."""
        return rundir.read_jsonl(self.path, rundir.TELEMETRY)

    def inside(self) -> list[dict]:
        """What inside.InsideRecorder recorded at each evaluation, by step."""
        return sorted(rundir.read_jsonl(self.path, rundir.INSIDE), key=lambda r: r["step"])

    def samples(self) -> list[dict]:
        """{"step", "text", "prompt", "temperature"} per sample training drew."""
        return rundir.read_jsonl(self.path, rundir.SAMPLES_JSONL)

    def completions(self) -> list[dict]:
        """--stage rl: {"step", "held_out": [{"prompt", "completion", "reward"}], "train": [...]} per evaluation."""
        return rundir.read_jsonl(self.path, rundir.COMPLETIONS)

    def samples_text(self) -> str:
        """samples.txt, the samples of runs from before samples.jsonl ("" when missing)."""
        return rundir.read_text(self.path, rundir.SAMPLES_TXT) if rundir.exists(self.path, rundir.SAMPLES_TXT) else ""

    def landscape_images(self) -> list[Path]:
        return [Path(e.path) for e in rundir.list_dir(self.path, rundir.LANDSCAPE) if e.name.endswith(".png")]

    def landscape_image(self, path: Path) -> bytes:
        """One of landscape_images(), read without following a link."""
        return rundir.read_bytes(self.path, Path(rundir.LANDSCAPE, Path(path).name))

    def snapshots(self) -> list[Snapshot]:
        """The weight snapshots, oldest first."""
        return [Snapshot(rundir.snapshot_step(Path(e.path)), Path(e.path))
                for e in rundir.list_dir(self.path, rundir.TRAJECTORY) if rundir.SNAPSHOT.fullmatch(e.name)]

    def checkpoints(self) -> list[CheckpointFolder]:
        """Its checkpoint folders, newest first, as listed (verify() checks one)."""
        return [CheckpointFolder(rundir.checkpoint_step(p), p) for p in reversed(checkpoint_dirs(self.path))]

    def good_checkpoints(self, warn: Callable[[str], None] = _warn) -> Iterator[CheckpointFolder]:
        """The checkpoints that verify, newest first (damaged ones are reported through `warn` and skipped)."""
        for path in good_checkpoints(self.path, warn):
            yield CheckpointFolder(rundir.checkpoint_step(path), path)

    # -- its model -------------------------------------------------------------------------------------------------

    def tokenizer(self) -> tok.Tokenizer:
        """RUN/tokenizer.json, refused when it is not the one the run was trained with."""
        tokenizer = tok.from_json_checked(rundir.read_json(self.path, rundir.TOKENIZER), self.path / rundir.TOKENIZER)
        expected = self.vocab_size
        if expected is not None and expected != tokenizer.vocab_size:
            raise LmlabError(f"{rundir.TOKENIZER} of {self.path} has {tokenizer.vocab_size} symbols but the model "
                             f"expects {expected}; the tokenizer file belongs to another run")
        fingerprint = self.config_json.get("tokenizer_fingerprint")
        if fingerprint is not None and fingerprint != tokenizer.fingerprint():
            raise LmlabError(f"{rundir.TOKENIZER} of {self.path} is not the tokenizer this run was trained with")
        return tokenizer

    def load(self, device: str | torch.device = "cpu", which: str | int = "best") -> "LoadedRun":
        """Model and tokenizer from its best good checkpoint (the lowest validation loss; or `which`: 'last', or a
        step number). Executes no code from the folder; a model too big for memory is refused before it is built."""
        tokenizer = self.tokenizer()
        check_fits(self.config.model, tokenizer.vocab_size, f"run {self.path}")
        model = build_model(self.config.model, tokenizer.vocab_size).to(device)
        ckpt = load_newest(self.path, model, None, device, which=which)
        if ckpt is None:
            if checkpoint_dirs(self.path):
                raise LmlabError(f"every checkpoint of run {self.path} is damaged; nothing can be loaded")
            raise LmlabError(f"run {self.path} has no checkpoint yet; train it first (lmlab train --resume "
                             f"{self.path})")
        model.eval()
        return LoadedRun(self, tokenizer, model, ckpt)


@dataclass
class LoadedRun:
    """A run with its model loaded from one checkpoint."""

    run: Run
    tokenizer: tok.Tokenizer
    model: torch.nn.Module
    checkpoint: Checkpoint

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def config(self) -> TrainConfig:
        return self.run.config

    @property
    def is_chat(self) -> bool:
        return self.run.is_chat


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", which: str | int = "best") -> LoadedRun:
    """Run.open(run_dir).load(device, which)."""
    return Run.open(run_dir).load(device, which)


def is_lmlab_run(source: str) -> bool:
    """Whether an --init-from source names an lmlab run folder (its config.json is lmlab's: a schema version and a
    model section) rather than a transformers model folder or a hub id."""
    path = Path(source).expanduser()
    if not (path.is_dir() and rundir.is_run(path)):
        return False
    try:
        config = Run(path).config_json
    except LmlabError:
        return False
    return "schema_version" in config and isinstance(config.get("model"), dict)


def init_from_run(cfg: TrainConfig, say: Callable[[str], None] = _warn
                  ) -> tuple[TrainConfig, tok.Tokenizer, dict[str, torch.Tensor]]:
    """`lmlab train --init-from RUN`: the new run's config with the base run's model (its architecture and sizes;
    the context is the new run's block_size up to the base's, dropout the new run's), the base's tokenizer, and the
    weights of its best checkpoint (Run.load: the run folder is read as untrusted input, JSON and safetensors only,
    and a model too big for memory is refused before it is built)."""
    loaded = load_run(cfg.init_from, "cpu", which="best")
    base = loaded.config.model
    block = min(cfg.model.block_size, base.block_size) if cfg.model.block_size else base.block_size
    model = dataclasses.replace(base, block_size=block, dropout=cfg.model.dropout, attn_dropout=cfg.model.attn_dropout)
    weights = loaded.model.state_dict()
    if model.pos == "learned" and block < base.block_size:  # the first rows of the position table
        weights["wpe.weight"] = weights["wpe.weight"][:block].clone()
    t = loaded.tokenizer
    data = dataclasses.replace(cfg.data, tokenizer=t.kind, vocab_size=t.vocab_size if t.kind == "bpe"
                               else cfg.data.vocab_size)
    val = loaded.checkpoint.state.get("val_loss")
    say(f"initialised from run {cfg.init_from}, its best checkpoint ({loaded.checkpoint.path.name}"
        f"{f', val loss {val:.4f}' if isinstance(val, (int, float)) else ''}): {model.arch} {model.n_layer}L/"
        f"{model.n_head}H/{model.n_embd}d, context {block} of its {base.block_size}; its {t.kind} tokenizer "
        f"({t.vocab_size} tokens) encodes the data")
    return dataclasses.replace(cfg, model=model, data=data), t, weights


def export_run(run_dir: str | Path, out: str | Path, trust_pickle: bool = False,
               warn: Callable[[str], None] = _warn, which: str | int = "best") -> Path:
    """Copy a run with its best checkpoint (or `which`) as single files (safetensors + JSON), e.g. from a sharded
    FSDP run.

    The copy needs no process group and resumes, samples and evaluates like any one-process run. trust_pickle lets
    an old torch.distributed.checkpoint checkpoint be converted, after a warning: loading it unpickles its metadata.
    """
    from .optim import build_optimizer

    run, out = Run.open(run_dir), Path(out)
    check_new_folder(out)
    tokenizer = run.tokenizer()
    cfg = run.config
    check_fits(cfg.model, tokenizer.vocab_size, f"run {run.path}", training=True)  # weights and optimizer state
    model = build_model(cfg.model, tokenizer.vocab_size)
    optimizer = build_optimizer(model, cfg.optim)
    path = next(good_checkpoints(run.path, warn, allow_pickle=trust_pickle), None)
    if path is None:
        raise LmlabError(f"run {run.path} has no good checkpoint to export")
    state = verify_checkpoint(path, allow_pickle=trust_pickle)
    if state.get("format") == "dcp":  # an old run: its newest checkpoint, converted
        warn(f"warning: loading {path} with torch.distributed.checkpoint, which unpickles its metadata and can run "
             f"code from it (--trust-pickle); do this only for runs from a source you trust")
        ckpt = load_dcp_trusting_pickle(path, state, model, optimizer)
    else:
        ckpt = load_newest(run.path, model, optimizer, "cpu", warn, which)
    out.mkdir(parents=True, exist_ok=True)
    for name in rundir.RUN_FILES:
        if rundir.exists(run.path, name):
            rundir.write_bytes(out, name, rundir.read_bytes(run.path, name))
    internal = {"schema_version", "step", "optimizer", "optimizer_tensors", "files", "format", "world_size", "tensors"}
    kept = {k: v for k, v in ckpt.state.items() if k not in internal}
    save_single(out, ckpt.step, model, optimizer, ckpt.rng, kept, keep=1)
    made_here = rundir.sources_made_here(run.path, run.run_id)
    if made_here:  # lmlab's own copy, made here: it reads the corpus paths its source read
        rundir.remember_sources(out, run.run_id, sorted(made_here), warn)
    return checkpoint_path(out, ckpt.step)

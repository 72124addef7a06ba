"""Run directories and checkpoints: safetensors weights + JSON state, written atomically, verified on load.

    RUN/config.json          every setting of the run (schema_version inside)
    RUN/tokenizer.json       the tokenizer, reloaded for sampling and eval
    RUN/metrics.jsonl        one JSON object per step / eval
    RUN/checkpoints/step_00001000/{model.safetensors, optimizer.safetensors, state.json}

A checkpoint folder is written under a temporary name and renamed when complete; state.json records the SHA-256
of the other files, so a damaged checkpoint is detected and the previous good one is used.

A run trained with --parallel fsdp writes sharded checkpoints instead, with torch.distributed.checkpoint (DCP):

    RUN/checkpoints/step_00001000/{dcp/.metadata, dcp/__R_0.distcp (one per rank), rng.safetensors, state.json}

Both kinds load into any layout (one process, DDP or FSDP, any number of ranks): DCP reshards on load. Note that
DCP's .metadata file is a pickle written by PyTorch; its hash is checked first, but load sharded checkpoints only
from sources you trust, and share runs as single files (`lmlab export`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from . import tokenizer as tok
from .common import SCHEMA_VERSION, LmlabError, atomic_write_json, read_json, sha256_file
from .distributed import Dist, barrier, is_sharded, like, unwrap

CHECKPOINTS = "checkpoints"
PREFIX = "step_"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and plain values (for JSON)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if is_sharded(value):  # FSDP: this rank's shard, saved by DCP
                tensors[f"state.{idx}.{key}"] = value.detach()
            elif isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in the order optimizer.state_dict() numbers them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict,
                        path: Path) -> None:
    """Load the optimizer state of checkpoint `path` (split by optimizer_to_flat); a misfit is one clear error."""
    try:
        _optimizer_from_flat(optimizer, tensors, plain)
    except (ValueError, KeyError, RuntimeError) as e:
        raise LmlabError(f"optimizer state in {path} does not fit this run: {e}") from None


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    params = _optimizer_params(optimizer)
    for idx, values in plain["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        p = params[int(idx)]
        if is_sharded(p) and not is_sharded(value) and value.shape == p.shape:
            value = like(p, value)  # a single-file checkpoint resumed under FSDP: keep this rank's shard
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    state: dict,
    keep: int = 3,
    d: Optional[Dist] = None,
) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep` checkpoints.

    Data-parallel: call it on every rank. DDP (and one process) writes once, from rank 0; FSDP writes shards.
    """
    d = d or Dist()
    if d.sharded:
        _save_sharded(run_dir, step, model, optimizer, rng, state, keep, d)
    elif d.main:
        try:
            _save_single(run_dir, step, unwrap(model), optimizer, rng, state, keep)
        finally:
            barrier(d)
    else:
        barrier(d)
    return checkpoint_path(run_dir, step)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:08d}"


def _save_single(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 rng: dict[str, torch.Tensor], state: dict, keep: int) -> None:
    final = checkpoint_path(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        _test_pause()
        opt_tensors, opt_plain = optimizer_to_flat(optimizer)
        opt_tensors.update({f"rng.{k}": v.contiguous() for k, v in rng.items()})
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        for name in ("model.safetensors", "optimizer.safetensors"):
            _fsync_file(tmp / name)
        record = {
            "schema_version": SCHEMA_VERSION,
            "step": step,
            "optimizer": opt_plain,
            "files": {name: sha256_file(tmp / name) for name in ("model.safetensors", "optimizer.safetensors")},
            **state,
        }
        _publish(tmp, final, record)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(run_dir, keep)


def _publish(tmp: Path, final: Path, record: dict) -> None:
    """state.json last, then one rename: a checkpoint folder is either complete or absent."""
    atomic_write_json(tmp / "state.json", record)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _prune(run_dir: Path, keep: int) -> None:
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _save_sharded(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  rng: dict[str, torch.Tensor], state: dict, keep: int, d: Dist) -> None:
    """FSDP: every rank writes its shards with DCP into one temporary folder; rank 0 seals it."""
    import torch.distributed.checkpoint as dcp

    final = checkpoint_path(run_dir, step)
    tmp = final.parent / f".{final.name}.dcp.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "dcp").mkdir(parents=True)
    barrier(d)
    opt_tensors, opt_plain = optimizer_to_flat(optimizer)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
    dcp.save(tensors, checkpoint_id=str(tmp / "dcp"))
    barrier(d)
    if d.main:
        try:
            save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
            names = ["rng.safetensors"] + sorted(f"dcp/{p.name}" for p in (tmp / "dcp").iterdir())
            for name in names:
                _fsync_file(tmp / name)
            record = {
                "schema_version": SCHEMA_VERSION,
                "step": step,
                "format": "dcp",
                "world_size": d.world,
                "optimizer": opt_plain,
                "optimizer_tensors": sorted(opt_tensors),
                "files": {name: sha256_file(tmp / name) for name in names},
                **state,
            }
            _publish(tmp, final, record)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            barrier(d)
            raise
        _prune(run_dir, keep)
    barrier(d)


def _test_pause() -> None:
    """LMLAB_TEST_CHECKPOINT_PAUSE=seconds holds a checkpoint half-written, so the crash test can kill it there."""
    pause = os.environ.get("LMLAB_TEST_CHECKPOINT_PAUSE")
    if pause:
        import time

        time.sleep(float(pause))


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete what a killed process left half-written: temporary checkpoint folders and temporary files."""
    run_dir = Path(run_dir)
    stale = [p for p in run_dir.glob(".*.tmp")]
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        stale += [p for p in root.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


@dataclass
class Checkpoint:
    path: Path
    state: dict
    optimizer_tensors: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def verify_checkpoint(path: Path) -> dict:
    """Read state.json and check the recorded hashes; raise LmlabError naming what is wrong."""
    state_path = path / "state.json"
    if not state_path.exists():
        raise LmlabError(f"checkpoint {path} has no state.json (incomplete)")
    state = read_json(state_path)
    version = state.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise LmlabError(f"checkpoint {path} has schema version {version}; this lmlab reads up to {SCHEMA_VERSION}")
    files = state.get("files")
    if not isinstance(files, dict) or not _valid_file_list(state.get("format", "single"), set(files)):
        raise LmlabError(f"checkpoint {path} has an invalid file list in state.json")
    for name, digest in files.items():
        f = path / name
        if not f.exists():
            raise LmlabError(f"checkpoint {path} is missing {name}")
        if sha256_file(f) != digest:
            raise LmlabError(f"checkpoint file {f} is damaged (its SHA-256 does not match the one recorded)")
    return state


_DCP_FILE = re.compile(r"dcp/(\.metadata|__\d+_\d+\.distcp)")


def _valid_file_list(kind: str, names: set[str]) -> bool:
    """Only these names are ever read: a state.json cannot point the loader at other files."""
    if kind == "single":
        return names == {"model.safetensors", "optimizer.safetensors"}
    if kind == "dcp":
        rest = names - {"rng.safetensors"}
        return "rng.safetensors" in names and "dcp/.metadata" in rest and all(_DCP_FILE.fullmatch(n) for n in rest)
    return False


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    device: str | torch.device = "cpu") -> Checkpoint:
    """Load weights (and optimizer state) from one checkpoint folder, after verifying it.

    `model` may be plain, DDP-wrapped or FSDP-sharded; with FSDP or a sharded checkpoint every rank calls this.
    """
    state = verify_checkpoint(path)
    model = unwrap(model)
    if state.get("format") == "dcp":
        return _load_sharded(path, state, model, optimizer)
    if any(is_sharded(p) for p in model.parameters()):
        _load_weights_into_shards(path, model)
        return _load_optimizer_file(path, state, optimizer, device)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False, device=str(device))
    except (SafetensorError, RuntimeError, OSError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(e).__name__)
        raise LmlabError(f"cannot load weights from {path}: {detail}; was it written with another config?") from None
    if missing or unexpected:
        raise LmlabError(
            f"checkpoint {path} does not fit this model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); was it written with another config?"
        )
    return _load_optimizer_file(path, state, optimizer, device)


def _load_optimizer_file(path: Path, state: dict, optimizer: Optional[torch.optim.Optimizer],
                         device: str | torch.device) -> Checkpoint:
    try:
        tensors = load_file(str(path / "optimizer.safetensors"))
    except (SafetensorError, OSError) as e:
        raise LmlabError(f"cannot read {path / 'optimizer.safetensors'}: {e}") from None
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    opt_tensors = {k: v.to(device) for k, v in tensors.items() if k.startswith("state.")}
    if optimizer is not None:
        optimizer_from_flat(optimizer, opt_tensors, state["optimizer"], path)
    return Checkpoint(path, state, opt_tensors, rng)


def _load_weights_into_shards(path: Path, model: torch.nn.Module) -> None:
    """A single-file checkpoint into an FSDP-sharded model: every rank reads the file and keeps its shard."""
    tensors = load_file(str(path / "model.safetensors"))
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights are saved under one name
        aliases.setdefault(id(p), []).append(name)
    with torch.no_grad():
        for name, p in model.named_parameters():
            source = next((tensors[n] for n in aliases[id(p)] if n in tensors), None)
            if source is None or tuple(source.shape) != tuple(p.shape):
                raise LmlabError(f"checkpoint {path} does not fit this model ({name}); was it written with another config?")
            p.copy_(like(p, source))


def _load_sharded(path: Path, state: dict, model: torch.nn.Module,
                  optimizer: Optional[torch.optim.Optimizer]) -> Checkpoint:
    """A DCP checkpoint into any layout: DCP reads into the tensors given, resharding as needed."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    model_sd = model.state_dict()
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model_sd.items()}
    opt_tensors: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        params = _optimizer_params(optimizer)
        for name in state.get("optimizer_tensors", []):
            _, idx, _key = name.split(".", 2)
            opt_tensors[name] = torch.zeros_like(params[int(idx)])
        tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
    try:
        with warnings.catch_warnings():  # "loading in a single process" is what we mean when there is no group
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, checkpoint_id=str(path / "dcp"), no_dist=not dist.is_initialized())
    except Exception as e:  # noqa: BLE001 - DCP reports mismatches as several exception types
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LmlabError(f"cannot load sharded checkpoint {path}: {detail}; was it written with another config?") from None
    model.load_state_dict({k: tensors[f"model.{k}"] for k in model_sd})
    if optimizer is not None:
        optimizer_from_flat(optimizer, opt_tensors, state["optimizer"], path)
    try:
        rng = load_file(str(path / "rng.safetensors"))
    except (SafetensorError, OSError) as e:
        raise LmlabError(f"cannot read {path / 'rng.safetensors'}: {e}") from None
    return Checkpoint(path, state, opt_tensors, rng)


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_tokenizer(config: dict, tokenizer: tok.Tokenizer, run_dir: Path) -> None:
    """Refuse a tokenizer.json that is not the one the run was trained with."""
    expected = config.get("vocab_size")
    if expected is not None and expected != tokenizer.vocab_size:
        raise LmlabError(
            f"tokenizer.json of {run_dir} has {tokenizer.vocab_size} symbols but the model expects "
            f"{expected}; the tokenizer file belongs to another run"
        )
    fingerprint = config.get("tokenizer_fingerprint")
    if fingerprint is not None and fingerprint != tokenizer.fingerprint():
        raise LmlabError(f"tokenizer.json of {run_dir} is not the tokenizer this run was trained with")


def latest_good_checkpoint(run_dir: Path, warn=_warn) -> Optional[Path]:
    """The newest checkpoint that verifies; damaged ones are reported and skipped."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except LmlabError as e:
            warn(f"warning: {e}; falling back to the previous checkpoint")
    return None


# ---------------------------------------------------------------------------------------------------------------
# Loading a finished or running run for sampling / eval


@dataclass
class LoadedRun:
    run_dir: Path
    config: dict
    tokenizer: tok.Tokenizer
    model: torch.nn.Module
    checkpoint: Checkpoint


def read_run_config(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmlabError(f"no run at {run_dir} (not a directory)")
    if not (run_dir / "config.json").exists():
        raise LmlabError(f"{run_dir} is not an lmlab run (no config.json)")
    config = read_json(run_dir / "config.json")
    version = config.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise LmlabError(f"run {run_dir} has schema version {version}; this lmlab reads up to {SCHEMA_VERSION}")
    return config


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Build model + tokenizer from a run folder and load its newest good checkpoint. Executes no code from it."""
    from .model import ModelConfig, build_model

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    tokenizer = tok.load(run_dir / "tokenizer.json")
    path = latest_good_checkpoint(run_dir)
    if path is None:
        if checkpoint_dirs(run_dir):
            raise LmlabError(f"every checkpoint of run {run_dir} is damaged; nothing can be loaded")
        raise LmlabError(f"run {run_dir} has no checkpoint yet; train it first (lmlab train --resume {run_dir})")
    try:
        model_cfg = ModelConfig(**config["model"])
    except TypeError as e:
        raise LmlabError(f"config.json of {run_dir} has an unknown model setting ({e})") from None
    check_tokenizer(config, tokenizer, run_dir)
    model = build_model(model_cfg, tokenizer.vocab_size).to(device)
    ckpt = load_checkpoint(path, model, None, device)
    model.eval()
    return LoadedRun(run_dir, config, tokenizer, model, ckpt)


RUN_FILES = ("config.json", "tokenizer.json", "status.json", "metrics.jsonl", "probes.jsonl", "telemetry.jsonl",
             "samples.txt", "samples.jsonl")


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """Copy a run with its newest checkpoint as single files (safetensors + JSON), e.g. from a sharded FSDP run.

    The copy needs no process group and resumes, samples and evaluates like any one-process run.
    """
    from .model import ModelConfig, build_model
    from .optim import OptimConfig, build_optimizer

    run_dir, out = Path(run_dir), Path(out)
    config = read_run_config(run_dir)
    if out.exists() and any(out.iterdir()):
        raise LmlabError(f"{out} already exists and is not empty; choose another --out")
    path = latest_good_checkpoint(run_dir)
    if path is None:
        raise LmlabError(f"run {run_dir} has no good checkpoint to export")
    tokenizer = tok.load(run_dir / "tokenizer.json")
    check_tokenizer(config, tokenizer, run_dir)
    try:
        model = build_model(ModelConfig(**config["model"]), tokenizer.vocab_size)
        optimizer = build_optimizer(model, OptimConfig(**config["optim"]))
    except TypeError as e:
        raise LmlabError(f"config.json of {run_dir} has an unknown setting ({e})") from None
    ckpt = load_checkpoint(path, model, optimizer)
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, out / name)
    internal = {"schema_version", "step", "optimizer", "optimizer_tensors", "files", "format", "world_size"}
    state = {k: v for k, v in ckpt.state.items() if k not in internal}
    _save_single(out, ckpt.step, model, optimizer, ckpt.rng, state, keep=1)
    return checkpoint_path(out, ckpt.step)

"""Checkpoints: safetensors weights + JSON state, written atomically, checked on load, never unpickled.

    RUN/checkpoints/step_00001000/{model.safetensors, optimizer.safetensors, state.json}

A checkpoint folder is written under a temporary name and renamed when complete; state.json records the SHA-256
of the other files, so a damaged checkpoint is detected and the previous good one is used.

A run trained with --parallel fsdp writes sharded checkpoints: each rank saves the pieces it holds, and state.json
indexes them (each tensor's global shape, and where each piece sits in it):

    RUN/checkpoints/step_00001000/{shard_00000.safetensors (one per rank), rng.safetensors, state.json}

Both kinds load into any layout (one process, DDP or FSDP, any number of ranks): each rank reads the parts of the
pieces it needs. Loading reads only JSON and safetensors. Checkpoints that older versions wrote with
torch.distributed.checkpoint (whose metadata is a pickle) are refused; `lmlab export RUN --out OUT --trust-pickle`
converts one from a source you trust.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model

from . import rundir
from .common import SCHEMA_VERSION, LmlabError, atomic_write_json, parse_json, sha256_file
from .distributed import Dist, barrier, is_sharded, like, unwrap
from .model import unique_parameters
from .rundir import CHECKPOINTS, CKPT_DCP, CKPT_MODEL, CKPT_OPTIMIZER, CKPT_RNG, CKPT_STATE, shard_name

PREFIX = rundir.STEP_PREFIX
SINGLE_FILES = (CKPT_MODEL, CKPT_OPTIMIZER)
_DCP_FILE = re.compile(r"dcp/(\.metadata|__[0-9]+_[0-9]+\.distcp)")
_STEP_DIR = rundir.STEP_DIR
_SHA256 = re.compile(r"[0-9a-f]{64}")


class PickleCheckpoint(LmlabError):
    """A checkpoint in the old torch.distributed.checkpoint format, which only loads by unpickling."""


_named_once: set[str] = set()  # damaged entries already reported by this process


def checkpoint_dirs(run_dir: Path, warn: Optional[Callable[[str], None]] = None) -> list[Path]:
    """Checkpoint folders of a run, oldest first (a link named like one is listed, and refused when read). An entry
    that starts like one but is not step_ and ASCII digits (a folder from elsewhere, "step_²") is skipped, and named
    once per process."""
    dirs = []
    for e in rundir.list_dir(run_dir, CHECKPOINTS):
        if not e.name.startswith(PREFIX) or not (e.is_dir(follow_symlinks=False) or e.is_symlink()):
            continue
        if _STEP_DIR.fullmatch(e.name):
            dirs.append(Path(e.path))
        elif e.path not in _named_once:
            _named_once.add(e.path)
            (warn or _warn)(f"warning: skipping {e.path}: not a checkpoint folder name (step_ and digits 0-9)")
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / rundir.checkpoint_name(step)


def _file(path: Path, name: str) -> Path:
    """A file of checkpoint folder `path` (RUN/checkpoints/step_N), checked to be reached through no link."""
    return rundir.check_path(path.parent.parent, Path(CHECKPOINTS, path.name, name))


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


# ---------------------------------------------------------------------------------------------------------------
# Optimizer state: tensors to safetensors, plain values to JSON


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and plain values (for JSON)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if is_sharded(value):  # FSDP: this rank's shard, saved as a piece
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
    """Load the optimizer *state* of checkpoint `path` (split by optimizer_to_flat); a misfit is one clear error.

    The hyperparameters (learning rate, weight decay, betas, momentum) stay those the optimizer was built with from
    the run's config: a setting changed on resume takes effect, and config.json says what the run uses.
    """
    try:
        _optimizer_from_flat(optimizer, tensors, plain)
    except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as e:
        raise LmlabError(f"optimizer state in {path} does not fit this run: {e}") from None


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    params = _optimizer_params(optimizer)
    current = optimizer.state_dict()["param_groups"]
    saved = plain["param_groups"]
    if [len(g["params"]) for g in current] != [len(g.get("params", ())) for g in saved]:
        raise ValueError("its parameter groups differ from this optimizer's (another --optimizer?)")
    state: dict[int, dict[str, Any]] = {}
    for idx, values in plain["scalars"].items():
        slot = _param_index(idx, params)
        for key, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"state {idx}.{key} is {value!r}, not a number")
            state.setdefault(slot, {})[key] = value
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        slot = _param_index(idx, params)
        p = params[slot]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}")
        if is_sharded(p) and not is_sharded(value):
            value = like(p, value)  # a single-file checkpoint resumed under FSDP: keep this rank's shard
        state.setdefault(slot, {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": current})


def _param_index(idx: str, params: list) -> int:
    if not (idx.isascii() and idx.isdigit()) or int(idx) >= len(params):
        raise ValueError(f"state for parameter {idx!r}, but the optimizer has {len(params)}")
    return int(idx)


# ---------------------------------------------------------------------------------------------------------------
# Saving


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
            save_single(run_dir, step, unwrap(model), optimizer, rng, state, keep)
        finally:
            barrier(d)
    else:
        barrier(d)
    return checkpoint_path(run_dir, step)


def save_single(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 rng: dict[str, torch.Tensor], state: dict, keep: int) -> None:
    final = checkpoint_path(run_dir, step)
    root = rundir.make_dir(run_dir, CHECKPOINTS)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_model(model, str(tmp / CKPT_MODEL))
        opt_tensors, opt_plain = optimizer_to_flat(optimizer)
        opt_tensors.update({f"rng.{k}": v.contiguous() for k, v in rng.items()})
        save_file(opt_tensors, str(tmp / CKPT_OPTIMIZER))
        for name in SINGLE_FILES:
            _fsync_file(tmp / name)
        record = {
            "schema_version": SCHEMA_VERSION,
            "step": step,
            "optimizer": opt_plain,
            "files": {name: sha256_file(tmp / name) for name in SINGLE_FILES},
            **state,
        }
        _publish(tmp, final, record)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(run_dir, keep)


def _publish(tmp: Path, final: Path, record: dict) -> None:
    """state.json last, then one rename: a checkpoint folder is either complete or absent."""
    atomic_write_json(tmp / CKPT_STATE, record)
    if os.path.lexists(final):
        if final.is_symlink():
            final.unlink()
        else:
            shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _prune(run_dir: Path, keep: int) -> None:
    """All but the newest `keep` checkpoints go, except the best one (the lowest validation loss at its step)."""
    best = next(iter(_by_validation(run_dir)), None)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        if old == best:
            continue
        if old.is_symlink():
            old.unlink()  # the link, never what it points to
        else:
            shutil.rmtree(old, ignore_errors=True)


def local_offsets(t: torch.Tensor) -> list[int]:
    """Where this rank's piece of tensor `t` starts in the whole tensor (zeros for a plain tensor)."""
    if not is_sharded(t):
        return [0] * t.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(shape) != tuple(t.to_local().shape):
        raise RuntimeError(f"unexpected shard layout: local shape {tuple(t.to_local().shape)}, expected {shape}")
    return [int(o) for o in offsets]


def _save_sharded(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  rng: dict[str, torch.Tensor], state: dict, keep: int, d: Dist) -> None:
    """FSDP: every rank writes the pieces it holds into one temporary folder; rank 0 indexes them and seals it."""
    final = checkpoint_path(run_dir, step)
    tmp = final.parent / f".{final.name}.shards.tmp"
    if d.main:
        rundir.make_dir(run_dir, CHECKPOINTS)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(d)
    opt_tensors, opt_plain = optimizer_to_flat(optimizer)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
    pieces, where = {}, {}
    for name, t in tensors.items():
        if is_sharded(t) or d.main:  # a replicated tensor is saved once, by rank 0
            local = t.to_local() if is_sharded(t) else t
            if local.numel():
                pieces[name] = local.detach().cpu().contiguous()
                where[name] = {"offsets": local_offsets(t), "global_shape": list(t.shape)}
    shard = shard_name(d.rank)
    save_file(pieces, str(tmp / shard), metadata={"lmlab_pieces": json.dumps(where)})
    _fsync_file(tmp / shard)
    barrier(d)
    if d.main:
        try:
            save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / CKPT_RNG))
            _fsync_file(tmp / CKPT_RNG)
            shards = [shard_name(r) for r in range(d.world)]
            record = {
                "schema_version": SCHEMA_VERSION,
                "step": step,
                "format": "sharded",
                "world_size": d.world,
                "optimizer": opt_plain,
                "tensors": _index(tmp, shards),
                "files": {name: sha256_file(tmp / name) for name in [CKPT_RNG, *shards]},
                **state,
            }
            _publish(tmp, final, record)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            barrier(d)
            raise
        _prune(run_dir, keep)
    barrier(d)


def _index(folder: Path, shards: list[str]) -> dict:
    """name -> {shape, pieces: [{file, offsets, shape}]}, from what each rank wrote in its shard's metadata."""
    index: dict[str, dict] = {}
    for i, shard in enumerate(shards):
        with safe_open(str(folder / shard), framework="pt") as f:
            where = parse_json((f.metadata() or {}).get("lmlab_pieces", "{}"), f"the metadata of {shard}")
            for name in f.keys():
                entry = index.setdefault(name, {"shape": where[name]["global_shape"], "pieces": []})
                entry["pieces"].append({"file": i, "offsets": where[name]["offsets"],
                                        "shape": list(f.get_slice(name).get_shape())})
    return index


# ---------------------------------------------------------------------------------------------------------------
# Checking


@dataclass
class Checkpoint:
    path: Path
    state: dict
    optimizer_tensors: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def verify_checkpoint(path: Path, allow_pickle: bool = False) -> dict:
    """Read state.json, check its fields and the recorded hashes; raise LmlabError naming what is wrong.

    An old torch.distributed.checkpoint checkpoint raises PickleCheckpoint unless allow_pickle (export only).
    """
    if not rundir.exists(path.parent.parent, Path(CHECKPOINTS, path.name, CKPT_STATE)):
        raise LmlabError(f"checkpoint {path} has no {CKPT_STATE} (incomplete)")
    state = rundir.read_json(path.parent.parent, Path(CHECKPOINTS, path.name, CKPT_STATE))
    problem = _state_problem(state, path)
    if problem:
        raise LmlabError(f"checkpoint {path} has a malformed {CKPT_STATE} ({problem})")
    if state.get("format") == "dcp" and not allow_pickle:
        raise PickleCheckpoint(
            f"checkpoint {path} is in the torch.distributed.checkpoint format of older lmlab versions, which loads "
            f"by unpickling (running code from the file); lmlab never loads it implicitly. If you trust where the run "
            f"came from, convert it: lmlab export {path.parent.parent} --out OUT --trust-pickle")
    for name, digest in state["files"].items():
        f = _file(path, name)
        if not os.path.lexists(f):
            raise LmlabError(f"checkpoint {path} is missing {name}")
        with rundir.open_read(path.parent.parent, Path(CHECKPOINTS, path.name, name)) as handle:
            if _sha256(handle) != digest:
                raise LmlabError(f"checkpoint file {f} is damaged (its SHA-256 does not match the one recorded)")
    return state


def _sha256(f) -> str:
    import hashlib

    h = hashlib.sha256()
    while block := f.read(1 << 20):
        h.update(block)
    return h.hexdigest()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _evals_ok(v: Any) -> bool:
    """The overfitting watch's state (telemetry.EvalHistory)."""
    return (isinstance(v, dict) and _is_number(v.get("train_sum")) and _is_int(v.get("train_n"))
            and isinstance(v.get("said"), bool) and isinstance(v.get("evals"), list) and len(v["evals"]) <= 1000
            and all(isinstance(e, list) and len(e) == 2 and _is_number(e[0]) and (e[1] is None or _is_number(e[1]))
                    for e in v["evals"]))


def _state_problem(state: Any, path: Path) -> str:
    """What is wrong with a state.json (its types and names), or "" when it is well formed."""
    if not isinstance(state, dict):
        return "not a JSON object"
    version = state.get("schema_version")
    if not _is_int(version) or version > SCHEMA_VERSION:
        return f"schema version {version!r}; this lmlab reads up to {SCHEMA_VERSION}"
    if not _is_int(state.get("step")) or f"{PREFIX}{state['step']:08d}" != path.name:
        return f"step {state.get('step')!r} does not match the folder name"
    if not _is_int(state.get("tokens")) or state["tokens"] < 0:
        return "tokens must be a count"
    if not _is_number(state.get("elapsed_s")) or state["elapsed_s"] < 0:
        return "elapsed_s must be a number of seconds"
    for key, check in (("lr_scale", lambda v: _is_number(v) and v > 0), ("skipped_steps", _is_int),
                       ("rollbacks", _is_int), ("best_val_loss", lambda v: v is None or _is_number(v)),
                       ("val_loss", lambda v: v is None or _is_number(v)), ("evals", _evals_ok),
                       ("heldout_reward", _is_number), ("best_heldout_reward", lambda v: v is None or _is_number(v)),
                       ("spikes", lambda v: isinstance(v, dict) and all(_is_number(v.get(k))
                                                                       for k in ("mean", "var", "count")))):
        if key in state and not check(state[key]):
            return f"{key} is {state[key]!r}"
    optimizer = state.get("optimizer")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("scalars"), dict)
            and all(isinstance(v, dict) for v in optimizer["scalars"].values())
            and isinstance(optimizer.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"])):
        return "the optimizer record is malformed"
    files = state.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) and _SHA256.fullmatch(v) for v in files.values()):
        return "the file list is malformed"
    kind = state.get("format", "single")
    if not _valid_file_list(kind, set(files), state.get("world_size")):
        return "invalid file list"  # only these names are ever read: state.json cannot point the loader elsewhere
    if kind == "sharded":
        return _index_problem(state.get("tensors"), len(files) - 1)
    return ""


def _valid_file_list(kind: Any, names: set[str], world: Any) -> bool:
    if kind == "single":
        return names == set(SINGLE_FILES)
    if kind == "sharded":
        return _is_int(world) and world >= 1 and names == {CKPT_RNG} | {
            shard_name(r) for r in range(world)}
    if kind == "dcp":
        rest = names - {CKPT_RNG}
        return CKPT_RNG in names and "dcp/.metadata" in rest and all(_DCP_FILE.fullmatch(n) for n in rest)
    return False


def _index_problem(index: Any, n_files: int) -> str:
    """The sharded index must place every piece inside its tensor, without overlaps, covering all of it."""
    if not isinstance(index, dict):
        return "the shard index is missing"
    for name, entry in index.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        pieces = entry.get("pieces") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape) and isinstance(pieces, list)):
            return f"the shard index entry of {name} is malformed"
        boxes = []
        for piece in pieces:
            ok = (isinstance(piece, dict) and _is_int(piece.get("file")) and 0 <= piece["file"] < n_files
                  and all(isinstance(piece.get(k), list) and len(piece[k]) == len(shape)
                          and all(_is_int(v) and v >= 0 for v in piece[k]) for k in ("offsets", "shape")))
            if not ok or any(o + s > g for o, s, g in zip(piece["offsets"], piece["shape"], shape)):
                return f"a piece of {name} lies outside it"
            boxes.append((piece["offsets"], piece["shape"]))
        if any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]):
            return f"pieces of {name} overlap"
        if sum(math.prod(s) for _, s in boxes) != math.prod(shape):
            return f"the pieces of {name} do not cover it"
    return ""


def _overlap(a: tuple[list[int], list[int]], b: tuple[list[int], list[int]]) -> bool:
    return all(max(oa, ob) < min(oa + sa, ob + sb) for oa, sa, ob, sb in zip(a[0], a[1], b[0], b[1]))


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


CHOICES = "best (the lowest validation loss; an rl run's highest held-out reward), last (the newest) or a step number"


def parse_choice(which: str) -> str | int:
    """A --checkpoint value: 'best', 'last' or a step number."""
    if which in ("best", "last"):
        return which
    if which.isascii() and which.isdigit():
        return int(which)
    raise LmlabError(f"--checkpoint {which!r} is not {CHOICES}")


def _quick_state(path: Path) -> Optional[dict]:
    """A checkpoint's state.json if it reads and is well formed (its files are not hashed here), else None."""
    try:
        state = rundir.read_json(path.parent.parent, Path(CHECKPOINTS, path.name, CKPT_STATE))
    except LmlabError:
        return None
    return None if _state_problem(state, path) else state


def _by_validation(run_dir: Path) -> list[Path]:
    """The checkpoints written at an evaluation, lowest validation loss first (the newer of equals first); an rl
    run's, highest held-out reward first (the newer of equals first)."""
    by_loss, by_reward = [], []
    for path in checkpoint_dirs(run_dir):
        state = _quick_state(path)
        if state is not None and state.get("heldout_reward") is not None:
            by_reward.append((-state["heldout_reward"], -state["step"], path))
        elif state is not None and state.get("val_loss") is not None:
            by_loss.append((state["val_loss"], -state["step"], path))
    return [path for *_, path in sorted(by_reward or by_loss)]


def chosen_checkpoints(run_dir: Path, which: str | int = "last", warn: Callable[[str], None] = _warn):
    """The good checkpoints in the order to try them: `last`, newest first; `best`, the lowest validation loss at
    its step first, then the rest newest first (so a run without evaluations loads its newest); a step number, only
    that one (an error when it is not there or damaged)."""
    which = parse_choice(which) if isinstance(which, str) else which
    if isinstance(which, int):
        path = checkpoint_path(run_dir, which)
        if path not in checkpoint_dirs(run_dir):
            steps = ", ".join(p.name[len(PREFIX):].lstrip("0") or "0" for p in checkpoint_dirs(run_dir)) or "none"
            raise LmlabError(f"run {run_dir} has no checkpoint at step {which} (it has: {steps})")
        verify_checkpoint(path)
        yield path
        return
    newest = list(reversed(checkpoint_dirs(run_dir)))
    order = newest if which == "last" else _by_validation(run_dir) + [p for p in newest
                                                                       if p not in _by_validation(run_dir)]
    for path in order:
        try:
            verify_checkpoint(path)
        except PickleCheckpoint:
            raise
        except LmlabError as e:
            warn(f"warning: {e}; falling back to the {'previous' if which == 'last' else 'next best'} checkpoint")
            continue
        yield path


def latest_good_checkpoint(run_dir: Path, warn: Callable[[str], None] = _warn) -> Optional[Path]:
    """The newest checkpoint that verifies; damaged ones are reported and skipped."""
    return next(good_checkpoints(run_dir, warn), None)


def good_checkpoints(run_dir: Path, warn: Callable[[str], None] = _warn, allow_pickle: bool = False):
    """The checkpoints that verify, newest first; damaged ones are reported and skipped. An old pickle-based one is
    an error, never skipped past silently."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            verify_checkpoint(path, allow_pickle)
        except PickleCheckpoint:
            raise
        except LmlabError as e:
            warn(f"warning: {e}; falling back to the previous checkpoint")
            continue
        yield path


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    device: str | torch.device = "cpu") -> Checkpoint:
    """Load weights (and optimizer state) from one checkpoint folder, after verifying it.

    `model` may be plain, DDP-wrapped or FSDP-sharded; with FSDP or a sharded checkpoint every rank calls this.
    """
    state = verify_checkpoint(path)
    model = unwrap(model)
    if state.get("format") == "sharded":
        return _load_sharded(path, state, model, optimizer, device)
    if any(is_sharded(p) for p in model.parameters()):
        _load_weights_into_shards(path, model)
        return _load_optimizer_file(path, state, optimizer, device)
    try:
        missing, unexpected = load_model(model, str(_file(path, CKPT_MODEL)), strict=False,
                                         device=str(device))
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        raise LmlabError(f"cannot load weights from {path}: {_first_line(e)}; was it written with another "
                         f"config?") from None
    if missing or unexpected:
        raise LmlabError(
            f"checkpoint {path} does not fit this model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); was it written with another config?"
        )
    return _load_optimizer_file(path, state, optimizer, device)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(e).__name__)


def _read_safetensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load

        return load(rundir.read_bytes(path.parent.parent, Path(CHECKPOINTS, path.name, name)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LmlabError(f"cannot read {path / name}: {_first_line(e)}") from None


def _load_optimizer_file(path: Path, state: dict, optimizer: Optional[torch.optim.Optimizer],
                         device: str | torch.device) -> Checkpoint:
    tensors = _read_safetensors(path, CKPT_OPTIMIZER)
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    opt_tensors = {k: v.to(device) for k, v in tensors.items() if k.startswith("state.")}
    if optimizer is not None:
        optimizer_from_flat(optimizer, opt_tensors, state["optimizer"], path)
    return Checkpoint(path, state, opt_tensors, rng)


def _aliases(model: torch.nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter (tied weights are saved under one of them)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _load_weights_into_shards(path: Path, model: torch.nn.Module) -> None:
    """A single-file checkpoint into an FSDP-sharded model: every rank reads the file and keeps its shard."""
    tensors = _read_safetensors(path, CKPT_MODEL)
    aliases = _aliases(model)
    with torch.no_grad():
        for name, p in unique_parameters(model):
            source = next((tensors[n] for n in aliases[id(p)] if n in tensors), None)
            if source is None or tuple(source.shape) != tuple(p.shape):
                raise LmlabError(f"checkpoint {path} does not fit this model ({name}); was it written with another config?")
            p.copy_(like(p, source))


def _load_sharded(path: Path, state: dict, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                  device: str | torch.device) -> Checkpoint:
    """A sharded checkpoint into any layout: each rank copies in the parts of the pieces that it holds."""
    index = state["tensors"]
    model_sd = model.state_dict()
    targets: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model_sd.items()}
    opt_tensors: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        params = _optimizer_params(optimizer)
        for name, entry in index.items():
            if name.startswith("optimizer."):
                idx = name.split(".")[2]
                p = params[int(idx)] if idx.isascii() and idx.isdigit() and int(idx) < len(params) else None
                like_param = p is not None and list(p.shape) == entry["shape"]
                opt_tensors[name[len("optimizer."):]] = (torch.zeros_like(p) if like_param else
                                                         torch.zeros(entry["shape"], device=device))
        targets.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
    missing = sorted(set(k for k in targets if k.startswith("model.")) - set(index))
    if missing:
        raise LmlabError(f"checkpoint {path} does not fit this model (missing {missing[:3]}); was it written with "
                         f"another config?")
    readers: dict[int, Any] = {}
    try:
        with torch.no_grad():
            for name, target in targets.items():
                _fill(target, name, index[name], path, readers)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LmlabError(f"cannot load sharded checkpoint {path}: {_first_line(e)}") from None
    finally:
        readers.clear()
    model.load_state_dict({k: targets[f"model.{k}"] for k in model_sd})
    if optimizer is not None:
        optimizer_from_flat(optimizer, opt_tensors, state["optimizer"], path)
    rng = _read_safetensors(path, CKPT_RNG)
    return Checkpoint(path, state, opt_tensors, rng)


def _fill(target: torch.Tensor, name: str, entry: dict, path: Path, readers: dict[int, Any]) -> None:
    """Copy into `target` (this rank's piece of a tensor, or all of it) the parts of the saved pieces it covers."""
    if list(target.shape) != entry["shape"]:
        raise ValueError(f"{name} has shape {tuple(entry['shape'])} in the checkpoint, {tuple(target.shape)} here")
    local = target.to_local() if is_sharded(target) else target
    start = local_offsets(target)
    covered = 0
    for piece in entry["pieces"]:
        lo = [max(a, b) for a, b in zip(start, piece["offsets"])]
        hi = [min(a + n, b + m) for a, n, b, m in zip(start, local.shape, piece["offsets"], piece["shape"])]
        if any(a >= b for a, b in zip(lo, hi)):
            continue
        reader = readers.get(piece["file"])
        if reader is None:
            shard = shard_name(piece['file'])
            reader = readers[piece["file"]] = safe_open(str(_file(path, shard)), framework="pt")
        piece_slice = reader.get_slice(name)
        if list(piece_slice.get_shape()) != piece["shape"]:
            raise ValueError(f"the piece of {name} in shard {piece['file']} does not have the shape indexed")
        if local.dim() == 0:
            local.copy_(reader.get_tensor(name))
        else:
            src = piece_slice[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, piece["offsets"]))]
            local[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, start))].copy_(src)
        covered += math.prod(b - a for a, b in zip(lo, hi))
    if covered != local.numel():
        raise ValueError(f"the pieces of {name} do not cover this rank's part of it")


def load_dcp_trusting_pickle(path: Path, state: dict, model: torch.nn.Module,
                              optimizer: torch.optim.Optimizer) -> Checkpoint:
    """An old torch.distributed.checkpoint checkpoint, for `lmlab export --trust-pickle` only: DCP unpickles its
    metadata, which can run code, so nothing else ever calls this."""
    import torch.distributed.checkpoint as dcp

    model_sd = model.state_dict()
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model_sd.items()}
    params = _optimizer_params(optimizer)
    opt_tensors = {name: torch.zeros_like(params[_param_index(name.split(".", 2)[1], params)])
                   for name in state.get("optimizer_tensors", []) if isinstance(name, str) and name.count(".") >= 2}
    tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
    try:
        with warnings.catch_warnings():  # "loading in a single process" is what we mean when there is no group
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, checkpoint_id=str(path / CKPT_DCP), no_dist=True)
    except Exception as e:  # noqa: BLE001 - DCP reports mismatches as several exception types
        raise LmlabError(f"cannot load sharded checkpoint {path}: {_first_line(e)}") from None
    except BaseException as e:  # its CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise LmlabError(f"cannot load sharded checkpoint {path}: {_first_line(e)}") from None
    model.load_state_dict({k: tensors[f"model.{k}"] for k in model_sd})
    optimizer_from_flat(optimizer, opt_tensors, state["optimizer"], path)
    return Checkpoint(path, state, opt_tensors, _read_safetensors(path, CKPT_RNG))


def load_newest(run_dir: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                device: str | torch.device = "cpu", warn: Callable[[str], None] = _warn,
                which: str | int = "last") -> Optional[Checkpoint]:
    """Load the newest checkpoint that verifies and loads (or, with `which`, the best or the one at a step: see
    chosen_checkpoints); one that verifies but cannot be loaded (a hash-valid file that is not what its state.json
    says) is reported and the next one is used. None: no checkpoint."""
    errors: list[LmlabError] = []
    for path in chosen_checkpoints(run_dir, which, warn):
        try:
            ckpt = load_checkpoint(path, model, optimizer, device)
        except PickleCheckpoint:
            raise
        except LmlabError as e:
            errors.append(e)
            continue
        for e in errors:  # said only when an older one did load: when none does, the first error says it all
            warn(f"warning: {e}; fell back to an older checkpoint")
        return ckpt
    if errors:
        raise errors[0]
    return None

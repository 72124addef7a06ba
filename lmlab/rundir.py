"""The run folder: the names of its files, and the only way lmlab opens them.

A run folder may come from someone else (a zip, a shared drive, a model hub), so everything in it is untrusted data:
- nothing inside it is reached through a symbolic link, for reading or for writing (the run path itself may be one);
- JSON is parsed with its depth bounded, and a malformed file is a one-line error, never a traceback;
- a JSONL line that does not parse as an object is skipped;
- lmlab deletes only the temporary files it makes itself;
- a corpus path its config.json names is opened only when lmlab wrote it there, in this folder, on this machine (a
  record in the user's cache says so), or when the user names the data again or says to trust it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import re
import secrets
import shlex
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

from .common import LmlabError, atomic_write_bytes, atomic_write_json, cache_dir, parse_json
from .data import is_path

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
PROBES = "probes.jsonl"
TELEMETRY = "telemetry.jsonl"
INSIDE = "inside.jsonl"
SAMPLES_TXT = "samples.txt"
SAMPLES_JSONL = "samples.jsonl"
REFERENCE = "reference.json"  # --stage dpo: the reference model's log-probabilities of the pairs' completions
COMPLETIONS = "completions.jsonl"  # --stage rl: completions and their rewards at each evaluation
LOCK = ".lock"
CHECKPOINTS = "checkpoints"
TRAJECTORY = "trajectory"
LANDSCAPE = "landscape"
TENSORBOARD = "tensorboard"

STEP_LOGS = (METRICS, PROBES, TELEMETRY, INSIDE, COMPLETIONS)  # cut back to the checkpoint on resume
RUN_FILES = (CONFIG, TOKENIZER, STATUS, METRICS, PROBES, TELEMETRY, INSIDE, SAMPLES_TXT,
             SAMPLES_JSONL, REFERENCE, COMPLETIONS)  # what export copies
STATUSES = ("running", "finished", "interrupted", "failed")


# Temporary names lmlab makes: atomic writes (".NAME.RANDOM.tmp"), checkpoint folders (".step_N.RANDOM.tmp",
# ".step_N.shards.tmp"; ".step_N.dcp.tmp" from older versions) and weight snapshots (".step_N.safetensors.tmp").
_TEMP = re.compile(r"\.(?:(?:%s)\.[A-Za-z0-9_]+|step_[0-9]{8}\.[A-Za-z0-9_.]+)\.tmp" % "|".join(
    re.escape(n) for n in (*RUN_FILES, "meta.json", "landscape.json")))


class LinkInRun(LmlabError):
    """A symbolic link where a run's file or folder should be."""


def _link_error(path: Path) -> LinkInRun:
    return LinkInRun(f"{path} is a symbolic link; lmlab never follows links inside a run folder (replace it with "
                     f"the file itself)")


def check_path(run_dir: str | os.PathLike, rel: str | os.PathLike) -> Path:
    """RUN/rel, after checking that no part of it below RUN is a symbolic link (missing parts are fine)."""
    run_dir = Path(run_dir)
    path = run_dir
    for part in Path(rel).parts:
        if part in ("..", "/") or part.startswith("/"):
            raise LmlabError(f"{rel} is not a path inside the run folder")
        path = path / part
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise _link_error(path)
        except FileNotFoundError:
            break
    return run_dir / rel


def exists(run_dir: str | os.PathLike, rel: str | os.PathLike) -> bool:
    """Whether RUN/rel exists (a link there counts as existing: opening it then refuses it)."""
    try:
        os.lstat(check_path(run_dir, rel))
        return True
    except FileNotFoundError:
        return False


def _open_file(run_dir: str | os.PathLike, rel: str | os.PathLike, flags: int) -> int:
    """A descriptor of the regular file RUN/rel, opened without following a link anywhere below RUN."""
    path = check_path(run_dir, rel)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link_error(path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LmlabError(f"{path} is not a regular file")
    return fd


def open_read(run_dir: str | os.PathLike, rel: str | os.PathLike) -> BinaryIO:
    """RUN/rel opened for reading, refusing links and anything that is not a regular file."""
    return os.fdopen(_open_file(run_dir, rel, os.O_RDONLY), "rb")


def read_bytes(run_dir: str | os.PathLike, rel: str | os.PathLike) -> bytes:
    with open_read(run_dir, rel) as f:
        return f.read()


def read_text(run_dir: str | os.PathLike, rel: str | os.PathLike) -> str:
    """The file as text; bytes that are not UTF-8 become U+FFFD."""
    return read_bytes(run_dir, rel).decode("utf-8", errors="replace")


def read_json(run_dir: str | os.PathLike, rel: str | os.PathLike) -> Any:
    """A JSON file of the run; missing or malformed is one LmlabError."""
    path = check_path(run_dir, rel)
    try:
        data = read_bytes(run_dir, rel)
    except FileNotFoundError:
        raise LmlabError(f"missing file: {path}") from None
    except IsADirectoryError:
        raise LmlabError(f"{path} is not a regular file") from None
    return parse_json(data, str(path))


def parse_jsonl(data: bytes) -> list[dict]:
    """The JSON objects of a JSONL text, one per line; a line that is not one (cut short, damaged) is skipped."""
    records = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = parse_json(line, "line")
        except LmlabError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_jsonl(run_dir: str | os.PathLike, rel: str | os.PathLike) -> list[dict]:
    """The well-formed records of a JSONL file of the run ([] when it does not exist): see well_formed."""
    try:
        return well_formed(str(rel), parse_jsonl(read_bytes(run_dir, rel)))
    except FileNotFoundError:
        return []


# What the records of each log hold, as training writes them: a record whose fields have other types is skipped,
# so every reader can trust the types of what it gets.
def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _numbers_by_name(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _number(x) for k, x in v.items())


def _probe_results(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(p, dict) and isinstance(p.get("prompt"), str) and isinstance(p.get("continuation", ""), str)
        and isinstance(p.get("top", []), list)
        and all(isinstance(t, list) and len(t) == 2 and isinstance(t[0], str) and _number(t[1]) for t in p["top"])
        for p in v)


def _list_of(check) -> Any:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _keys(**checks) -> Any:
    """A JSON object whose fields, where present, pass their checks."""
    return lambda v: isinstance(v, dict) and all(check(v[k]) for k, check in checks.items() if k in v)


def _string(v: Any) -> bool:
    return isinstance(v, str)


def _predictions(v: Any) -> bool:
    """[[token, probability], ...]"""
    return isinstance(v, list) and all(isinstance(t, list) and len(t) == 2 and _string(t[0]) and _number(t[1])
                                       for t in v)


_SCORE_GRID = _list_of(_list_of(_number))  # [layer][head]
_INSIDE = {  # one record of inside.jsonl per evaluation (lmlab/inside.py writes it)
    "heads": _keys(previous_token=_SCORE_GRID, induction=_SCORE_GRID, duplicate_token=_SCORE_GRID),
    "repeat_loss": _keys(first=_number, second=_number, length=_count),
    "loss_by_position": _keys(loss=_list_of(_number), count=_list_of(_count)),
    "attention": _list_of(_keys(prompt=_string, tokens=_list_of(_string),
                                percent=_list_of(_list_of(_list_of(_list_of(_count)))))),  # [layer][head][query][key]
    "lens": _list_of(_keys(prompt=_string, top=_list_of(_predictions))),  # top: [layer][rank]
}


_METRIC_NUMBERS = ("train_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "val_loss", "val_bits_per_byte",
                   "val_accuracy", "val_perplexity", "spike_z", "lr_scale",
                   *(prefix + name for prefix in ("", "val_") for name in (  # --stage dpo (dpo.STATS)
                       "chosen_reward", "rejected_reward", "margin", "preference_accuracy", "chosen_logp",
                       "rejected_logp")),
                   # --stage rl (lmlab/rl.py): each step's rewards and measures, each evaluation's held-out rewards
                   "reward", "pass_at_1", "pass_at_g", "kl", "entropy", "completion_tokens", "clip_fraction",
                   "generation_s", "scoring_s", "update_s", "heldout_reward", "heldout_pass_at_1", "mixed_fraction",
                   "kept_fraction")
SHAPES: dict[str, dict[str, Any]] = {
    METRICS: {"step": _count, "tokens": _count, "val_tokens": _count, "val_stride": _count, "rollback": _count, "skipped_total": _count, "val_pairs": _count,
              **{k: _number for k in _METRIC_NUMBERS}, "exact_match": _numbers_by_name, "ended_turn": _number,
              "skipped": lambda v: isinstance(v, bool),
              "clipped": lambda v: isinstance(v, bool)},
    PROBES: {"step": _count, "probes": _probe_results},
    TELEMETRY: {"step": _count, "grad_norm": _numbers_by_name, "update_ratio": _numbers_by_name},
    INSIDE: {"step": _count, "seconds": _number, **_INSIDE},
    SAMPLES_JSONL: {"step": _count, "text": lambda v: isinstance(v, str),
                    "prompt": lambda v: v is None or isinstance(v, str), "temperature": _number},
    COMPLETIONS: {"step": _count, **{k: _list_of(_keys(prompt=_string, completion=_string, reward=_number))
                                     for k in ("held_out", "train")}},
}
REQUIRED = {METRICS: ("step",), PROBES: ("step", "probes"), TELEMETRY: ("step",), INSIDE: ("step",),
            SAMPLES_JSONL: ("text",), COMPLETIONS: ("step",)}


def well_formed(name: str, records: list[dict]) -> list[dict]:
    """The records of log `name` whose fields have the types training writes (others, damaged, are skipped)."""
    shape, required = SHAPES.get(name), REQUIRED.get(name, ())
    if shape is None:
        return records
    return [r for r in records if all(k in r for k in required)
            and all(check(r[k]) for k, check in shape.items() if k in r)]


APPENDED = (*STEP_LOGS, SAMPLES_TXT, SAMPLES_JSONL)  # the files lmlab appends to (the others it replaces whole)


def _hard_link_error(path: Path, links: int) -> LmlabError:
    return LmlabError(f"{path} has {links} hard links (other names of the same file, maybe outside the run); "
                      f"lmlab appends to it, which would change them too: replace it with a copy of its own "
                      f"(cp {shlex.quote(str(path))} x && mv x {shlex.quote(str(path))})")


def open_append(run_dir: str | os.PathLike, rel: str | os.PathLike):
    """RUN/rel opened for appending text (created if missing), never through a link, symbolic or hard."""
    fd = _open_file(run_dir, rel, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    links = os.fstat(fd).st_nlink
    if links > 1:
        os.close(fd)
        raise _hard_link_error(check_path(run_dir, rel), links)
    return os.fdopen(fd, "a", encoding="utf-8")


def append_text(run_dir: str | os.PathLike, rel: str | os.PathLike, text: str) -> None:
    with open_append(run_dir, rel) as f:
        f.write(text)


def append_jsonl(run_dir: str | os.PathLike, rel: str | os.PathLike, record: dict) -> None:
    append_text(run_dir, rel, json.dumps(record) + "\n")


def write_bytes(run_dir: str | os.PathLike, rel: str | os.PathLike, data: bytes) -> None:
    """Replace RUN/rel atomically (a link there is replaced, never followed)."""
    check_path(run_dir, Path(rel).parent)
    atomic_write_bytes(Path(run_dir) / rel, data)


def write_json(run_dir: str | os.PathLike, rel: str | os.PathLike, obj: Any) -> None:
    write_bytes(run_dir, rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def cut_jsonl(run_dir: str | os.PathLike, rel: str | os.PathLike, step: int) -> None:
    """Drop the records written after `step` (resume goes on from a checkpoint at that step), and any line that does
    not parse, so the log reads as one clean run."""
    if not exists(run_dir, rel):
        return
    kept = [json.dumps(r) for r in read_jsonl(run_dir, rel) if _step_of(r) <= step]
    write_bytes(run_dir, rel, ("\n".join(kept) + "\n").encode() if kept else b"")


def _step_of(record: dict) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else float("inf")


def make_dir(run_dir: str | os.PathLike, rel: str | os.PathLike) -> Path:
    """RUN/rel as a folder (made if missing), never through a link."""
    path = check_path(run_dir, rel)
    path.mkdir(parents=True, exist_ok=True)
    check_path(run_dir, rel)
    if not path.is_dir():
        raise LmlabError(f"{path} is not a folder")
    return path


def list_dir(run_dir: str | os.PathLike, rel: str | os.PathLike) -> list[os.DirEntry]:
    """The entries of RUN/rel ([] when it does not exist), refusing a link to a folder."""
    path = check_path(run_dir, rel)
    try:
        with os.scandir(path) as entries:
            return sorted(entries, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def check_no_links(run_dir: str | os.PathLike) -> None:
    """Refuse a run folder that holds a link anywhere lmlab reads or writes, or a hard link where it appends
    (before a resume writes anything)."""
    for rel in (".", CHECKPOINTS, TRAJECTORY, LANDSCAPE):
        for entry in list_dir(run_dir, rel):
            if entry.is_symlink():
                raise _link_error(Path(entry.path))
            if rel == "." and entry.name in APPENDED and entry.stat(follow_symlinks=False).st_nlink > 1:
                raise _hard_link_error(Path(entry.path), entry.stat(follow_symlinks=False).st_nlink)
            if rel == CHECKPOINTS and entry.is_dir(follow_symlinks=False):
                for inner in list_dir(run_dir, Path(CHECKPOINTS, entry.name)):
                    if inner.is_symlink():
                        raise _link_error(Path(inner.path))


# ---------------------------------------------------------------------------------------------------------------
# Inside RUN/checkpoints and RUN/trajectory
#
#   RUN/checkpoints/step_00001000/{model.safetensors, optimizer.safetensors, state.json}    (one process, ddp)
#   RUN/checkpoints/step_00001000/{shard_00000.safetensors, ..., rng.safetensors, state.json}  (fsdp: one per rank)
#   RUN/trajectory/step_00001000.safetensors                                                (weight snapshots)

STEP_PREFIX = "step_"
CKPT_STATE = "state.json"
CKPT_MODEL = "model.safetensors"
CKPT_OPTIMIZER = "optimizer.safetensors"
CKPT_RNG = "rng.safetensors"
CKPT_DCP = "dcp"  # older sharded checkpoints (torch.distributed.checkpoint)
SHARD = re.compile(r"shard_([0-9]{5})\.safetensors")
STEP_DIR = re.compile(r"step_[0-9]+")  # ASCII digits only: str.isdigit() and \d also take "²", which int() refuses
SNAPSHOT = re.compile(r"step_[0-9]{8}\.safetensors")  # a weight snapshot in RUN/trajectory


def checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a checkpoint folder (named like STEP_DIR)."""
    return int(Path(path).name[len(STEP_PREFIX):])


def shard_name(rank: int) -> str:
    return f"shard_{rank:05d}.safetensors"


def snapshot_name(step: int) -> str:
    return f"{checkpoint_name(step)}.safetensors"


def snapshot_step(path: str | os.PathLike) -> int:
    """The step of a weight snapshot (named like SNAPSHOT)."""
    return int(Path(path).name[len(STEP_PREFIX):].split(".")[0])


# ---------------------------------------------------------------------------------------------------------------
# The run's config, status and lock


def is_run(path: str | os.PathLike) -> bool:
    """Whether `path` is a run folder (it has a config.json, a regular file)."""
    try:
        return stat.S_ISREG(os.lstat(Path(path) / CONFIG).st_mode)
    except OSError:
        return False


def created(run_dir: str | os.PathLike) -> float:
    """When the run started (its config.json was written), as a Unix time."""
    return os.lstat(Path(run_dir) / CONFIG).st_mtime


def write_status(run_dir: str | os.PathLike, status: str, **extra) -> None:
    """RUN/status.json says whether the run is running, finished, interrupted or failed (a dashboard reads it).

    A "running" status whose writer has died (the run's .lock is free) means the process crashed.
    """
    write_json(run_dir, STATUS, {"status": status, "pid": os.getpid(), "time": time.time(), **extra})


def read_status(run_dir: str | os.PathLike) -> Optional[dict]:
    """status.json when it is well formed; None when it is missing, and {"status": "unknown"} when malformed."""
    try:
        status = read_json(run_dir, STATUS)
    except LmlabError:
        return None if not exists(run_dir, STATUS) else {"status": "unknown"}
    if not isinstance(status, dict) or status.get("status") not in STATUSES:
        return {"status": "unknown"}
    clean = {"status": status["status"]}
    for key in ("error", "steps", "val_loss", "world_size", "time", "pid"):
        value = status.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            clean[key] = value[:500] if isinstance(value, str) else value
    return clean


class RunLock:
    """An exclusive lock on a run directory, so two trainings never write the same run."""

    def __init__(self, run_dir: Path):
        self.path = check_path(run_dir, LOCK)
        self.fd: Optional[int] = None

    def __enter__(self):
        import fcntl

        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _link_error(self.path) from None
            raise LmlabError(f"run {self.path.parent} is not writable ({e.strerror})") from None
        for _ in range(5):  # a reader (lmlab serve checking the status) may hold it for a moment
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                time.sleep(0.05)
        os.close(self.fd)
        self.fd = None
        raise LmlabError(f"run {self.path.parent} is locked: another training is writing it")

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)


def lock_held(run_dir: Path) -> bool:
    """Whether a training process holds the run's .lock (training flocks it exclusively while it writes)."""
    import fcntl

    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False  # we got it, so nobody holds it; closing the file releases it at once
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def run_status(run_dir: Path) -> dict:
    """What the run is doing: status.json as training wrote it ("running", "finished", "interrupted" or "failed"),
    where "running" from a process that died (its lock is free) reads "failed"; a malformed status.json reads
    "unknown". A run from before status.json: running if its lock is held, else finished when it has a checkpoint."""
    try:
        status = read_status(run_dir)
    except LmlabError:  # a link where status.json should be
        status = {"status": "unknown"}
    if status is None:
        if lock_held(run_dir):
            return {"status": "running"}
        has_checkpoint = any(e.name.startswith("step_") for e in _entries(run_dir, CHECKPOINTS))
        return {"status": "finished" if has_checkpoint else "unknown"}
    if status["status"] == "running" and not lock_held(run_dir):
        return {**status, "status": "failed",
                "error": "the training process ended without saying so (it crashed or was killed)"}
    return status


def _entries(run_dir: Path, rel: str) -> list[os.DirEntry]:
    try:
        return list_dir(run_dir, rel)
    except LmlabError:
        return []


def run_names(paths: list[Path]) -> list[str]:
    """Label runs by folder name; where two share one, add parent folders to those two until the labels differ."""
    parts = [p.resolve().parts for p in paths]
    depth = [1] * len(parts)
    while True:
        names = [Path(*pp[-d:]).as_posix() for pp, d in zip(parts, depth)]
        clashing = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clashing:
            return names
        for i in clashing:
            depth[i] += 1


class JsonlTail:
    """The records of a JSONL file of a run that training is still appending to, read incrementally: each call reads
    only the complete lines added since the last one. A file that was replaced or shortened (a resumed run cuts its
    logs back to its checkpoint) is read again from the start under a new epoch number. A link is never read."""

    _epochs = itertools.count(1)  # epoch numbers are unique across files, so a client cannot confuse two

    def __init__(self, run_dir: Path, rel: str):
        self.run_dir, self.rel = Path(run_dir), rel
        self.records: list[dict] = []
        self.epoch = 0
        self._offset = 0
        self._inode: Optional[int] = None
        self._lock = threading.Lock()

    def read(self) -> tuple[int, list[dict]]:
        """(epoch, every record so far); within an epoch the list is only appended to."""
        with self._lock:
            try:
                f = open_read(self.run_dir, self.rel)
            except (OSError, LmlabError):  # missing, or not a regular file of the run
                f = None
            with f if f is not None else contextlib.nullcontext():
                st = os.fstat(f.fileno()) if f is not None else None
                if st is None or st.st_ino != self._inode or st.st_size < self._offset:
                    self.records, self._offset, self.epoch = [], 0, next(self._epochs)
                    self._inode = st.st_ino if st else None
                if st is not None and st.st_size > self._offset:
                    f.seek(self._offset)
                    data = f.read(st.st_size - self._offset)
                    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next call
                    self._offset += len(complete)
                    self.records += well_formed(self.rel, parse_jsonl(complete))
            return self.epoch, self.records


# ---------------------------------------------------------------------------------------------------------------
# Making a run folder, and cleaning up after a killed one


def is_own_temp(name: str) -> bool:
    """Whether `name` is one of the temporary names lmlab itself makes (and so may delete)."""
    return _TEMP.fullmatch(name) is not None


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete what a killed process left half-written: lmlab's own temporary files and folders, nothing else."""
    stale = []
    for rel in (".", CHECKPOINTS, TRAJECTORY, LANDSCAPE):
        for entry in list_dir(run_dir, rel):
            if is_own_temp(entry.name):
                stale.append(Path(entry.path))
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)  # a link is removed itself, never what it points to
    return stale


OWN_NAMES = (LOCK, STATUS, TOKENIZER)  # what a run that died before writing its config can hold (.lock first)


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse to start a run in a folder that holds a run already, or anything lmlab did not put there (a
    tokenizer.json or status.json is lmlab's only beside the .lock that a run makes before anything else)."""
    if exists(run_dir, CONFIG):
        raise LmlabError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another --out")
    if not run_dir.is_dir():
        return
    names = [e.name for e in list_dir(run_dir, ".")]
    own = OWN_NAMES if LOCK in names else ()
    foreign = [name for name in names if name not in own and not is_own_temp(name)]
    if foreign:
        raise LmlabError(f"{run_dir} is not empty and is not an lmlab run (it holds {foreign[0]!r}); "
                         f"choose an empty or new folder for --out")


# ---------------------------------------------------------------------------------------------------------------
# Runs made here: the corpus paths a run's config may name
#
# A run folder from elsewhere may name any file in its config.json ("data": "~/.aws/credentials"); training on it
# would copy pieces of that file into the run's probes, samples and token cache. So a path read from a run's config
# is opened only when lmlab itself wrote it there, in this folder, on this machine: a record in the user's cache,
# outside every run folder, keyed by the folder's resolved path and the random id that config.json carries. A copy
# keeps the id but not the path, a moved folder changes its path, and a run from elsewhere has neither.

RUN_ID = "run_id"  # a meta key of config.json
CHAT = "chat"  # a meta key of config.json: whether the run answers in conversations (Run.is_chat)


def new_run_id() -> str:
    return secrets.token_hex(16)


def _record_path(run_dir: Path, run_id: str) -> Path:
    key = hashlib.sha256(f"{Path(run_dir).resolve()}\0{run_id}".encode()).hexdigest()[:32]
    return cache_dir() / "runs" / f"{key}.json"


def sources_made_here(run_dir: Path, run_id: Any) -> set[str]:
    """The corpus paths lmlab wrote into the config of the run with this id, in this folder, on this machine ({}
    for a run copied, moved or made elsewhere)."""
    if not isinstance(run_id, str) or not run_id:
        return set()
    try:
        with open(_record_path(run_dir, run_id), "rb") as f:
            record = parse_json(f.read(), "the record of a run")
    except (OSError, LmlabError):
        return set()
    if (not isinstance(record, dict) or record.get("path") != str(Path(run_dir).resolve())
            or record.get(RUN_ID) != run_id or not isinstance(record.get("sources"), list)):
        return set()
    return {s for s in record["sources"] if isinstance(s, str)}


def remember_sources(run_dir: Path, run_id: str, sources: list[Optional[str]],
                     warn: Callable[[str], None] = lambda m: None) -> None:
    """Record in the user's cache that lmlab wrote these corpus paths into this run's config, in this folder."""
    paths = sources_made_here(run_dir, run_id) | {s for s in sources if s and is_path(s)}
    path = _record_path(run_dir, run_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"path": str(Path(run_dir).resolve()), RUN_ID: run_id, "sources": sorted(paths)})
    except OSError as e:
        warn(f"warning: cannot record the run in {path.parent} ({e.strerror or e}); resuming it will need --data")


def check_data_paths(run_dir: Path, run_id: Optional[str], sources: list[tuple[str, Optional[str]]], command: str,
                     trust: bool = False) -> None:
    """Refuse to open a corpus path taken from a run's config (each (option, source) in `sources`) unless lmlab
    wrote it there, in this folder, on this machine, or `trust` (--trust-data-path); the error says how to name
    the data instead. Named corpora, 'builtin' and synthetic:NAME are not paths, and always allowed."""
    if trust:
        return
    made_here = sources_made_here(run_dir, run_id)
    for option, source in sources:
        if source and is_path(source) and source not in made_here:
            raise LmlabError(
                f"{Path(run_dir) / CONFIG} names the corpus {source} ({option}), a path on this machine; lmlab opens "
                f"a path from a run's config only for a run it made here, in this folder, and it has no record of "
                f"making this one (a copy, a moved folder, a run from elsewhere or from before such records). Name "
                f"the data: {command} {shlex.quote(str(run_dir))} {option} PATH (that path or another), or add "
                f"--trust-data-path to read {source}")

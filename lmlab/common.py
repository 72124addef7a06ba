"""Shared plumbing: the error type users see, device and dtype choice, seeding, atomic file writes."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

SCHEMA_VERSION = 1


class LmlabError(Exception):
    """An error caused by the user's input or environment: printed as one line, exit code 2."""


def cache_dir() -> Path:
    """Where downloads and prepared token files live (LMLAB_CACHE, else XDG cache, else ~/.cache/lmlab)."""
    if os.environ.get("LMLAB_CACHE"):
        return Path(os.environ["LMLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmlab"


# glibc's mallopt parameters: freed blocks under M_MMAP_THRESHOLD bytes come from (and go back to) the heap instead
# of their own mapping, and the heap gives memory back to the kernel only when more than M_TRIM_THRESHOLD is free.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Ask the C library's malloc to keep freed memory for reuse. On CPU every activation of a step is a fresh
    tensor; glibc's defaults hand multi-MB blocks back to the kernel when they are freed, and the next step pays a
    page fault for each 4 KiB of them again (about 12,000 a step of the `tiny` recipe, against 300 with this). The
    process then keeps up to its peak memory. Returns whether it applied (Linux with glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1


MEMORY_ENV = "LMLAB_MAX_MEMORY"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from "123", "64G", "1.5T" or "512MB" (powers of 1024)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        size = float(value[: len(value) - len(unit)]) * _UNITS[unit]
    except ValueError:
        size = math.nan
    if not 0 < size < 1 << 62:
        raise LmlabError(f"{MEMORY_ENV}={text!r} is not a size; give bytes or a number with K, M, G or T (e.g. 64G)")
    return int(size)


def fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.3g} {unit}" if unit != "bytes" else f"{int(n)} bytes"
        n /= 1024
    return f"{n:,.3g} TiB"


def _read_int(path: str) -> Optional[int]:
    """The integer in a /proc or /sys file ("max" and absurd values, meaning no limit, read None)."""
    try:
        with open(path) as f:
            value = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return value if value < 1 << 60 else None


def _cgroup_room() -> Optional[int]:
    """What the memory cgroup of this process (v2 or v1) still lets it use: its limit less its current use."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "":  # v2
            folders, names = ("/sys/fs/cgroup" + path, "/sys/fs/cgroup"), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # v1
            folders = ("/sys/fs/cgroup/memory" + path, "/sys/fs/cgroup/memory")
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        for folder in folders:
            limit = _read_int(os.path.join(folder, names[0]))
            if limit is not None:
                return max(0, limit - (_read_int(os.path.join(folder, names[1])) or 0))
    return None


def _proc_bytes(path: str, key: str) -> Optional[int]:
    """A "Key:  N kB" line of /proc/meminfo or /proc/self/status, in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_limit() -> tuple[int, str]:
    """How many more bytes this process may allocate, and what sets that: the smallest of the machine's available
    memory, the address space its RLIMIT_AS (ulimit -v) leaves, and what its memory cgroup (a container's limit)
    leaves. $LMLAB_MAX_MEMORY replaces them all, for a model the user knows fits (in swap, say)."""
    if os.environ.get(MEMORY_ENV):
        return parse_size(os.environ[MEMORY_ENV]), f"${MEMORY_ENV}"
    limits = []
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    if available is None:
        try:
            available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = None
    if available is not None:
        limits.append((available, "the machine's available memory"))
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            mapped = _proc_bytes("/proc/self/status", "VmSize") or 0
            limits.append((max(0, soft - mapped), "its address-space limit (ulimit -v) less what it maps"))
    except (ImportError, OSError, ValueError):
        pass
    room = _cgroup_room()
    if room is not None:
        limits.append((room, "its memory cgroup's limit (a container's) less what the group uses"))
    return min(limits) if limits else (1 << 62, "no limit known")


def resolve_device(name: str) -> torch.device:
    """Turn auto|cpu|cuda|cuda:N|mps into a device, failing clearly when it is not available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmlabError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmlabError("--device cuda was asked for but CUDA is not available here; use --device cpu or auto")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LmlabError("--device mps was asked for but MPS is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise LmlabError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for a name; 'auto' means bfloat16 on CUDA and float32 elsewhere. bfloat16 and float16 are
    autocast over float32 weights; float64 makes the weights and all arithmetic double precision."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise LmlabError(f"unknown dtype {name!r}; use auto, float32, float64, bfloat16 or float16")
    return DTYPES[name]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """torch's default floating dtype set to `dtype` inside the block, and put back after it."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions instead
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def check_new_folder(out: str | os.PathLike) -> None:
    """Refuse an output folder that is a link (even one to nothing) or a folder that holds anything: an export
    writes only into a new or empty folder of its own."""
    if os.path.islink(out):
        raise LmlabError(f"{out} is a symbolic link; give a new or empty folder")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise LmlabError(f"{out} already exists and is not empty; give a new or empty folder")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file the user named (parse_json's bounds apply); missing or malformed is one LmlabError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise LmlabError(f"missing file: {path}") from None
    return parse_json(data, str(path))


# The one bound on how deep JSON from outside may nest, from disk (run folders, data, imported models) and from the
# network (request bodies) alike: lmlab writes and serves at most a few levels, and Python's parser recurses once per
# level, so a deeper text could exhaust its stack.
MAX_JSON_DEPTH = 64


def parse_json(data: bytes | str, what: str) -> Any:
    """JSON from untrusted bytes: too deep, not UTF-8 or not JSON is one LmlabError naming `what`."""
    try:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        text = data if isinstance(data, str) else data.decode("utf-8")
    except UnicodeError:
        raise LmlabError(f"{what} is not UTF-8 text") from None
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise LmlabError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        detail = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise LmlabError(f"{what} is not valid JSON ({detail})") from None


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(data: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings do not count), found without a
    parser, which would recurse once per level."""
    depth = deepest = 0
    for c in _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS):
        depth += 1 if c in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinity as null: JSON has no such numbers (a skipped step logs a NaN loss), and
    a browser's JSON.parse refuses them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def fmt_count(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}T"

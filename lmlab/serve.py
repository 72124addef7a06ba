"""`lmlab serve`: a local web app that shows runs learning (live charts, probes) and lets people play with
next-token prediction, plus an OpenAI-compatible completions API. It reads run folders; nothing imports it.

    GET  /                    the dashboard and the playground (static files in lmlab/static, no build step)
    GET  /api/runs            the runs served, with their status and latest numbers
    GET  /api/log             the metrics.jsonl, probes.jsonl or inside.jsonl records of a run added since the
                              client's last poll
    POST /api/next            the next-token distribution of a prompt under sampling settings, and one sampled token
    POST /api/surprisal       per-token surprisal of a text
    GET  /v1/models           the runs that have a checkpoint, as OpenAI models (id = run name)
    POST /v1/completions      OpenAI's completions schema, streamed as server-sent events when asked

Model names are looked up among the runs served, never opened as paths. Each request samples with its own
torch.Generator and KV cache; the model is shared read-only and reloaded when training writes a newer checkpoint.
Everything but the page itself (/ and /static) is refused to other web sites, and needs the API key when one is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import json
import math
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from .checkpoint import LoadedRun, checkpoint_dirs, load_run
from . import rundir
from .common import LmlabError, json_safe
from .inspect import next_token_distribution, surprisal
from .rundir import JsonlTail, run_names, run_status  # noqa: F401 - part of this module's interface
from .sample import find_stop, generate, prompt_ids, sampling_probs, stop_prefix_length

STATIC = Path(__file__).resolve().parent / "static"
MAX_CHOICES = 16  # prompts x n in one request
MAX_LOGPROBS = 20
MAX_STOPS = 4
MAX_TOP = 100  # bars of the playground's distribution
MAX_JSON_DEPTH = 32  # requests nest 2 deep; Python's parser recurses once per level, so a deep body could crash it
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]"]  # the Host names a loopback server answers to
DISCONNECT_POLL_S = 0.1  # how often a generation that is not streamed checks that its client is still there


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; going over a limit is answered with a 4xx, never a slow server."""

    max_tokens: int = 512
    """Tokens one completion may generate."""
    max_prompt_chars: int = 20_000
    """Characters in the prompts of one request (and in a text to score)."""
    max_concurrent: int = 4
    """Requests running a model at the same time (completions, next-token views, surprisal); one more is refused
    with 429."""


class ApiError(Exception):
    """A request the server refuses, answered in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ClientGone(ApiError):
    """Raised inside work whose client hung up, so the work stops; the answer (nginx's 499) reaches nobody."""

    def __init__(self):
        super().__init__(499, "the client closed the request", code="client_closed_request")


# ---------------------------------------------------------------------------------------------------------------
# The runs on disk


class RunSet:
    """The runs served: run folders named on the command line, and the run subfolders of folders of runs (looked up
    again on every call, so a training started after the server shows up)."""

    def __init__(self, sources: list[str | Path]):
        self.runs: list[Path] = []
        self.folders: list[Path] = []
        for source in sources:
            path = Path(source)
            if rundir.is_run(path):
                self.runs.append(path)
            elif path.is_dir():
                self.folders.append(path)
            elif path.exists():
                raise LmlabError(f"{source} is neither a run (a folder with {rundir.CONFIG}) nor a folder of runs")
            else:
                raise LmlabError(f"no such run or folder of runs: {source}")

    def current(self) -> dict[str, Path]:
        """Run name -> folder. Names are folder names, with parent folders added where two would clash."""
        paths = list(self.runs)
        for folder in self.folders:
            try:
                paths += sorted(p for p in folder.iterdir() if rundir.is_run(p))
            except OSError:
                continue  # the folder went away; its runs are no longer served
        unique = list({p.resolve(): p for p in paths}.values())
        return dict(zip(run_names(unique), unique))

    def find(self, name: Any) -> Path:
        runs = self.current()
        if not isinstance(name, str) or name not in runs:
            raise ApiError(404, f"the model {name!r} does not exist; GET /v1/models lists the runs served",
                           "model", "model_not_found")
        return runs[name]


class Tails:
    """One JsonlTail per file, made on first use."""

    def __init__(self):
        self._tails: dict[Path, JsonlTail] = {}
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> JsonlTail:
        with self._lock:
            return self._tails.setdefault(path, JsonlTail(path.parent, path.name))


def run_summary(name: str, run_dir: Path, tails: Tails) -> dict:
    """One line of the dashboard's run list: status, latest step and losses, checkpoint, model shape."""
    _, records = tails(run_dir / rundir.METRICS).read()
    last_train = next((r for r in reversed(records) if "train_loss" in r), {})
    evals = [r for r in records if isinstance(r.get("val_loss"), (int, float)) and math.isfinite(r["val_loss"])]
    val_losses = [r["val_loss"] for r in evals]
    best = min(reversed(evals), key=lambda r: r["val_loss"]) if evals else {}
    try:
        config = rundir.read_config(run_dir)
    except LmlabError:
        config = {}  # still listed, with what the log says
    model = config.get("model") or {}
    try:
        checkpoints = checkpoint_dirs(run_dir)
    except LmlabError:
        checkpoints = []
    return {
        "name": name,
        **{k: v for k, v in rundir.run_status(run_dir).items() if k in ("status", "error")},
        "step": last_train.get("step", 0),
        "tokens": last_train.get("tokens", 0),
        "elapsed_s": last_train.get("elapsed_s"),
        "train_loss": last_train.get("train_loss"),
        "val_loss": val_losses[-1] if val_losses else None,
        "val_stride": next((r.get("val_stride") for r in reversed(records) if "val_loss" in r), None),
        "best_val_loss": min(val_losses) if val_losses else None,
        "best_step": best.get("step"),
        "overfitting_step": next((r.get("step") for r in evals if r.get("overfitting")), None),
        "checkpoint_step": int(checkpoints[-1].name.split("_")[-1]) if checkpoints else None,
        "preset": config.get("preset"),
        "tokenizer": (config.get("data") or {}).get("tokenizer"),
        "vocab_size": config.get("vocab_size"),
        "model": {k: model.get(k) for k in ("arch", "n_layer", "n_head", "n_embd", "block_size")},
    }


def has_checkpoint(run_dir: Path) -> bool:
    try:
        return bool(checkpoint_dirs(run_dir))
    except LmlabError:  # a link where the checkpoints folder should be
        return False


# ---------------------------------------------------------------------------------------------------------------
# Models


class Models:
    """Loaded runs (each from its best checkpoint, or the last), reloaded when a newer checkpoint appears (checked on
    each request: one directory listing).
    A generation keeps the model it started with; the next request gets the new one."""

    def __init__(self, device: str | torch.device = "cpu", checkpoint: str = "best"):
        self.device, self.checkpoint = device, checkpoint
        self._loaded: dict[Path, tuple[Path, LoadedRun]] = {}  # run -> (newest checkpoint seen, what loaded)
        self._lock = threading.Lock()

    def get(self, name: str, run_dir: Path) -> LoadedRun:
        checkpoints = checkpoint_dirs(run_dir)
        if not checkpoints:
            raise ApiError(409, f"run {name!r} has no checkpoint yet; try again once training has written one",
                           "model", "model_not_ready")
        with self._lock:
            seen = self._loaded.get(run_dir)
            if seen is not None and seen[0] == checkpoints[-1]:
                return seen[1]
            try:
                run = load_run(run_dir, self.device, self.checkpoint)
            except (LmlabError, RuntimeError, MemoryError) as e:  # what is in a run folder is never a 500
                if seen is None:
                    detail = str(e) if isinstance(e, LmlabError) else f"{type(e).__name__}: {e}"
                    raise ApiError(409, f"run {name!r} cannot be loaded: {detail.splitlines()[0][:500]}", "model",
                                   "model_not_ready") from None
                run = seen[1]  # keep serving the checkpoint we have
            self._loaded[run_dir] = (checkpoints[-1], run)
            return run


# ---------------------------------------------------------------------------------------------------------------
# Validating requests (pure functions: a request body in, settings or an ApiError out)


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False,
            low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not (low < value if low_open else low <= value) or not value <= high:
        low_text = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise ApiError(400, f"{name} must be {low_text} and at most {high:g}, got {value!r}", name)
    return value


def _choice(body: dict, name: str, kinds: type | tuple, default, what: str):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (kinds is bool) or not isinstance(value, kinds):
        raise ApiError(400, f"{name} must be {what}, got {value!r}", name)
    return value


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def parse_sampling(body: dict) -> Sampling:
    """temperature in [0, 2] (0: greedy), top_k >= 0 (0: off), top_p in (0, 1] (1: off)."""
    return Sampling(float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                    _number(body, "top_k", 0, 0, 1 << 31, integer=True),
                    float(_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)))


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list[str]
    sampling: Sampling
    max_tokens: int = 16
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    stream: bool = False
    include_usage: bool = False
    logprobs: Optional[int] = None


# Parameters of OpenAI's schema that lmlab does not implement, with the one value that means "not used".
NEUTRAL = {"echo": False, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
           "suffix": None}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
         "stream_options", "logprobs", "user", *NEUTRAL}


def check_length(name: str, chars: int, limits: Limits) -> None:
    if chars > limits.max_prompt_chars:
        raise ApiError(413, f"the {name} has {chars:,} characters; this server takes at most "
                            f"{limits.max_prompt_chars:,} (lmlab serve --max-prompt-chars)", name, "prompt_too_long")


def parse_completion_request(body: Any, limits: Limits) -> CompletionRequest:
    """Check a /v1/completions body against OpenAI's schema and the server's limits."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise ApiError(400, f"unrecognized request argument: {unknown[0]}", unknown[0])
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if value is not None and value != neutral:
            raise ApiError(400, f"{name} is not supported by lmlab serve (only {json.dumps(neutral)})", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: the name of a run (GET /v1/models lists them)", "model")
    prompt = body.get("prompt", "")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "prompt must be a string or a non-empty list of strings", "prompt")
    check_length("prompt", sum(len(p) for p in prompts), limits)
    max_tokens = _number(body, "max_tokens", 16, 0, 1 << 31, integer=True)
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens:,}; this server generates at most {limits.max_tokens:,} "
                            f"tokens per completion (lmlab serve --max-tokens)", "max_tokens", "max_tokens_too_large")
    n = _number(body, "n", 1, 1, MAX_CHOICES, integer=True)
    if n * len(prompts) > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n={n} asks for more than {MAX_CHOICES} completions", "n")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOPS} strings", "stop")
    stream = _choice(body, "stream", bool, False, "true or false")
    options = _choice(body, "stream_options", dict, {}, "an object")
    if options and not stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
    include_usage = _choice(options, "include_usage", bool, False, "true or false")
    _choice(body, "user", str, None, "a string")
    return CompletionRequest(
        model=model, prompts=prompts, sampling=parse_sampling(body), max_tokens=max_tokens, n=n,
        stop=tuple(s for s in stops if s), seed=_number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True),
        stream=stream, include_usage=include_usage,
        logprobs=_number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True),
    )


def encode_prompt(run: LoadedRun, prompt: str) -> list[int]:
    try:
        return prompt_ids(run.tokenizer, prompt)
    except LmlabError as e:
        raise ApiError(400, f"the prompt cannot be encoded by this run's tokenizer: {e}", "prompt") from None


# ---------------------------------------------------------------------------------------------------------------
# Generating completions


def token_label(tokenizer, token_id: int) -> str:
    """A token's text for the logprobs lists; a token that is not whole UTF-8 characters is written as its bytes,
    the way OpenAI does: "bytes:\\xe2\\x80"."""
    raw = tokenizer.decode_bytes([token_id])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@dataclass
class TokenInfo:
    label: str
    offset: int
    """Where its text starts in prompt + completion (OpenAI's text_offset)."""
    logprob: Optional[float] = None
    """ln p(token) under the model (temperature 1, no filters); only when logprobs were asked for."""
    top: Optional[dict[str, float]] = None


@dataclass
class Chunk:
    """A piece of one choice's text with the tokens generated for it; the last piece has a finish_reason."""

    index: int
    text: str
    tokens: list[TokenInfo]
    finish_reason: Optional[str] = None


@torch.inference_mode()
def _token_info(tokenizer, logits: torch.Tensor, token_id: int, offset: int, top: Optional[int]) -> TokenInfo:
    info = TokenInfo(token_label(tokenizer, token_id), offset)
    if top is not None:
        logp = logits.float().log_softmax(-1)
        values, ids = logp.topk(min(top, logp.numel()))
        info.logprob = float(logp[token_id])
        info.top = {token_label(tokenizer, int(i)): float(v) for v, i in zip(values, ids)}
    return info


def completion_chunks(run: LoadedRun, ids: list[int], prompt_chars: int, req: CompletionRequest,
                      generator: torch.Generator, index: int = 0,
                      cancel: Optional[threading.Event] = None) -> Iterator[Chunk]:
    """One completion as chunks; joined, they are the completion. Chunks end on token boundaries, except where a
    stop string cuts the text; text that could be the start of a stop string is held back until it is known not to
    be. The last chunk says why generation ended ("stop" or "length") and lists every token generated, including
    those that made up the stop string (which is not part of the text). Once cancel is set, ClientGone is raised
    before the next token is generated."""
    decoder = run.tokenizer.stream_decoder()
    s = req.sampling
    tokens = generate(run.model, ids, req.max_tokens, s.temperature, s.top_k, s.top_p, generator, with_logits=True)
    sent = 0  # characters of the completion already yielded
    held, held_tokens = "", []
    try:
        for token_id, logits in tokens:
            if cancel is not None and cancel.is_set():
                raise ClientGone()
            held_tokens.append(_token_info(run.tokenizer, logits, token_id, prompt_chars + sent + len(held),
                                           req.logprobs))
            held += decoder.push(token_id)
            cut = find_stop(held, req.stop)
            if cut is not None:
                yield Chunk(index, held[:cut], held_tokens, "stop")
                return
            if not stop_prefix_length(held, req.stop):
                yield Chunk(index, held, held_tokens)
                sent += len(held)
                held, held_tokens = "", []
    finally:
        tokens.close()
    held += decoder.flush()
    cut = find_stop(held, req.stop)
    yield Chunk(index, held if cut is None else held[:cut], held_tokens, "length" if cut is None else "stop")


def make_generator(seed: Optional[int]) -> torch.Generator:
    """A request's own random numbers: from its seed (any 64-bit integer), else from the OS."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % (1 << 64))
    return generator


def all_chunks(run: LoadedRun, req: CompletionRequest, encoded: list[list[int]],
               cancel: Optional[threading.Event] = None) -> Iterator[Chunk]:
    """Every choice's chunks: prompt by prompt, n choices each, all from one generator seeded once."""
    generator = make_generator(req.seed)
    for p, (prompt, ids) in enumerate(zip(req.prompts, encoded)):
        for j in range(req.n):
            yield from completion_chunks(run, ids, len(prompt), req, generator, p * req.n + j, cancel)


def choice_json(chunk: Chunk, logprobs: bool) -> dict:
    return {"index": chunk.index, "text": chunk.text, "finish_reason": chunk.finish_reason,
            "logprobs": {"tokens": [t.label for t in chunk.tokens],
                         "token_logprobs": [t.logprob for t in chunk.tokens],
                         "top_logprobs": [t.top for t in chunk.tokens],
                         "text_offset": [t.offset for t in chunk.tokens]} if logprobs else None}


def usage_json(encoded: list[list[int]], completion_tokens: int) -> dict:
    prompt_tokens = sum(len(ids) for ids in encoded)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def complete(run: LoadedRun, req: CompletionRequest, encoded: list[list[int]], head: dict,
             cancel: Optional[threading.Event] = None) -> dict:
    """The response to a request that is not streamed: the chunks a stream would send, joined per choice."""
    choices: dict[int, Chunk] = {}
    for chunk in all_chunks(run, req, encoded, cancel):
        choice = choices.setdefault(chunk.index, Chunk(chunk.index, "", []))
        choice.text += chunk.text
        choice.tokens += chunk.tokens
        choice.finish_reason = chunk.finish_reason or choice.finish_reason
    return {**head, "choices": [choice_json(c, req.logprobs is not None) for c in choices.values()],
            "usage": usage_json(encoded, sum(len(c.tokens) for c in choices.values()))}


# ---------------------------------------------------------------------------------------------------------------
# The playground's views


@torch.inference_mode()
def sample_next(run: LoadedRun, prompt: str, s: Sampling, generator: torch.Generator) -> dict:
    """Draw one next token the way generation does, with its probability under the sampling settings and under
    the plain model."""
    token, logits = next(generate(run.model, encode_prompt(run, prompt), 1, s.temperature, s.top_k, s.top_p, generator,
                                  with_logits=True))
    logits = logits.float()
    sampled = float(sampling_probs(logits, s.temperature, s.top_k, s.top_p)[token])
    return {"token_id": token, "text": run.tokenizer.decode([token]), "probability": sampled,
            "model_probability": float(logits.softmax(-1)[token])}


def next_token_view(run: LoadedRun, prompt: str, s: Sampling, top: int, sample: bool, seed: Optional[int]) -> dict:
    """The top tokens after the prompt (inspect.next_token_distribution) and, when asked, one token drawn the way
    generation draws it."""
    try:
        rows = next_token_distribution(run.model, run.tokenizer, prompt, top, s.temperature, s.top_k, s.top_p)
    except LmlabError as e:
        raise ApiError(400, f"the prompt cannot be encoded by this run's tokenizer: {e}", "prompt") from None
    view = {"rows": [asdict(r) for r in rows], "prompt_tokens": len(encode_prompt(run, prompt)),
            "vocab_size": run.tokenizer.vocab_size, "checkpoint_step": run.checkpoint.step}
    if sample:
        view["sampled"] = sample_next(run, prompt, s, make_generator(seed))
    return view


def surprisal_view(run: LoadedRun, text: str) -> dict:
    try:
        tokens, metrics, first = surprisal(run.model, run.tokenizer, text)
    except LmlabError as e:
        raise ApiError(400, str(e), "text") from None
    return {"first": first, "per_token": [{"text": t.text, "nats": t.nats, "bits": t.bits, "top": t.top}
                                          for t in tokens], **metrics.as_dict()}


# ---------------------------------------------------------------------------------------------------------------
# Guarding the API: who may call it, and what a request body may be


def is_json_media_type(content_type: str) -> bool:
    """Whether a Content-Type header says JSON: the media type before any parameters is application/json, and a
    charset, if given, is UTF-8. A substring test would pass text/plain;charset=application/json, which a page
    from any site may POST without the browser asking the server first."""
    media_type, *params = content_type.split(";")
    if media_type.strip().lower() != "application/json":
        return False
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


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


def origin_matches_host(origin: str, host: Optional[str], scheme: str = "http") -> bool:
    """Whether an Origin header names the server the request was sent to: the request's scheme and the host name
    and port of its Host header, a missing port being the scheme's default. "null" (sandboxed frames, local files)
    never matches."""
    try:
        o, h = urlsplit(origin), urlsplit("//" + (host or ""))
        default = {"http": 80, "https": 443}.get(scheme)
        if o.scheme != scheme or not o.hostname or "@" in o.netloc + h.netloc or o.path not in ("", "/"):
            return False
        return o.hostname == h.hostname and (o.port or default) == (h.port or default)
    except ValueError:  # a port that is not a number
        return False


def cross_site_refusal(headers: Headers, scheme: str = "http") -> Optional[ApiError]:
    """Why a request looks sent by a page of another site, if it does. Browsers say where a request comes from
    (Sec-Fetch-Site, Origin); programs such as curl or the openai client send neither and pass."""
    site = headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in ("same-origin", "none"):
        why = f"Sec-Fetch-Site: {site}"
    elif "origin" in headers and not origin_matches_host(headers["origin"], headers.get("host"), scheme):
        why = f"Origin {headers['origin']} is not this server"
    else:
        return None
    return ApiError(403, f"cross-site requests are refused ({why}); this API answers its own page and programs",
                    code="cross_site_request", kind="permission_error")


def bearer_matches(authorization: Optional[str], api_key: str) -> bool:
    scheme, _, token = (authorization or "").strip().partition(" ")
    # compare_digest takes as long whatever the first wrong character, so timing does not leak the key
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class ApiGuard:
    """ASGI middleware in front of everything but the page itself (/ and /static/*, which carry no data and which
    a link from anywhere may open): refuses cross-site requests with 403, then, when the server has an API key,
    requests without `Authorization: Bearer KEY` with 401."""

    def __init__(self, app, api_key: Optional[str] = None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and not (path == "/" or path.startswith("/static/")):
            headers = Headers(scope=scope)
            error = cross_site_refusal(headers, scope.get("scheme", "http"))
            if error is None and self.api_key is not None and not bearer_matches(headers.get("authorization"),
                                                                                 self.api_key):
                error = ApiError(401, "this server needs its API key: send the header Authorization: Bearer KEY "
                                      "(the openai client: OpenAI(api_key=KEY))", code="invalid_api_key")
            if error is not None:
                extra = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
                await JSONResponse(error.body(), error.status, headers=extra)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """The JSON body of a request, refused when it is not JSON, larger than max_bytes or nested too deep."""
    if not is_json_media_type(request.headers.get("content-type", "")):
        raise ApiError(415, "send the request body as JSON (Content-Type: application/json)")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > max_bytes:
            raise ApiError(413, f"the request body is larger than {max_bytes:,} bytes", code="request_too_large")
        parts.append(part)
    data = b"".join(parts)
    if json_depth(data) > MAX_JSON_DEPTH:
        raise ApiError(400, f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} deep",
                       code="invalid_json")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None


async def until_disconnected(request: Request, work: Callable, *args) -> Any:
    """work(*args, cancel) in the threadpool, with cancel (a threading.Event) set as soon as the client hangs up,
    so that work which checks it stops instead of running on for nobody (it then raises ClientGone)."""
    cancel = threading.Event()
    task = asyncio.ensure_future(run_in_threadpool(work, *args, cancel))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                cancel.set()
        return task.result()
    finally:
        cancel.set()  # also when this coroutine is cancelled (the server shutting down)
        if not task.done():
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its ClientGone is expected


# ---------------------------------------------------------------------------------------------------------------
# The app


LOGS = {"metrics": rundir.METRICS, "probes": rundir.PROBES, "inside": rundir.INSIDE}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Backend:
    """What the routes share: the runs, their loaded models and log tails, the limits, and the slots of requests
    that run a model (all of them share one cap, --max-concurrent)."""

    def __init__(self, runs: RunSet, limits: Limits, device: str | torch.device, checkpoint: str = "best"):
        self.runs, self.limits = runs, limits
        self.models = Models(device, checkpoint)
        self.tails = Tails()
        self.slots = threading.BoundedSemaphore(limits.max_concurrent)
        self.max_body = 12 * limits.max_prompt_chars + 65536  # a character is at most 12 bytes of JSON ("\ud83d\ude00")

    def loaded(self, name: Any) -> LoadedRun:
        return self.models.get(name, self.runs.find(name))

    def take_slot(self) -> None:
        """Take a slot, or refuse the request with 429; whoever takes one releases it (self.slots.release)."""
        if not self.slots.acquire(blocking=False):
            raise ApiError(429, f"{self.limits.max_concurrent} requests are running a model, the most this server "
                                f"runs at once (lmlab serve --max-concurrent); try again shortly",
                           code="too_many_requests", kind="rate_limit_error")

    @contextlib.contextmanager
    def slot(self):
        self.take_slot()
        try:
            yield
        finally:
            self.slots.release()


async def text_request(request: Request, backend: Backend, field: str) -> tuple[dict, str]:
    """A playground request's JSON object and its text field, checked against the limits."""
    body = await read_json_body(request, backend.max_body)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    text = _choice(body, field, str, "", "a string")
    check_length(field, len(text), backend.limits)
    return body, text


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal in OpenAI's error format."""
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(LmlabError)
    async def unreadable_run(request: Request, e: LmlabError):
        # a run folder that cannot be read as it is (a link inside it, a malformed file): the run's problem, not ours
        return JSONResponse(ApiError(409, str(e), code="run_unreadable").body(), status_code=409)

    @app.exception_handler(RequestValidationError)
    async def invalid_query(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        param = str(first["loc"][-1]) if first.get("loc") else None
        return JSONResponse(ApiError(400, f"{param}: {first['msg']}", param).body(), status_code=400)


def add_dashboard_routes(app: FastAPI, backend: Backend) -> None:
    """The page and the data of its dashboard."""
    runs, tails = backend.runs, backend.tails

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/runs")
    def api_runs():
        return {"runs": json_safe([run_summary(name, path, tails) for name, path in runs.current().items()]),
                "limits": asdict(backend.limits)}

    @app.get("/api/log")
    def api_log(run: str, file: str = "metrics", since: int = 0, epoch: int = 0):
        """Records of a run's log; a client that sends back the epoch and count it has gets only the new ones."""
        if file not in LOGS:
            raise ApiError(400, f"file must be one of {', '.join(LOGS)}", "file")
        current, records = tails(runs.find(run) / LOGS[file]).read()
        start = since if epoch == current and 0 <= since <= len(records) else 0
        return {"epoch": current, "start": start, "records": json_safe(records[start:])}


def add_playground_routes(app: FastAPI, backend: Backend) -> None:
    """The playground's views of a model: the next-token distribution, and the surprisal of a text."""

    @app.post("/api/next")
    async def api_next(request: Request):
        body, prompt = await text_request(request, backend, "prompt")
        sampling = parse_sampling(body)
        top = _number(body, "top", 20, 1, MAX_TOP, integer=True)
        sample = _choice(body, "sample", bool, False, "true or false")
        seed = _number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True)
        run = await run_in_threadpool(backend.loaded, body.get("model"))
        with backend.slot():
            return await run_in_threadpool(next_token_view, run, prompt, sampling, top, sample, seed)

    @app.post("/api/surprisal")
    async def api_surprisal(request: Request):
        body, text = await text_request(request, backend, "text")
        run = await run_in_threadpool(backend.loaded, body.get("model"))
        with backend.slot():
            return await run_in_threadpool(surprisal_view, run, text)


def add_openai_routes(app: FastAPI, backend: Backend) -> None:
    """OpenAI's models and completions endpoints."""
    runs = backend.runs

    def model_json(name: str, path: Path) -> dict:
        return {"id": name, "object": "model", "created": int(rundir.created(path)),
                "owned_by": "lmlab"}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list",
                "data": [model_json(n, p) for n, p in runs.current().items() if has_checkpoint(p)]}

    @app.get("/v1/models/{model:path}")
    def retrieve_model(model: str):
        return model_json(model, runs.find(model))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_completion_request(await read_json_body(request, backend.max_body), backend.limits)
        run = await run_in_threadpool(backend.loaded, req.model)
        encoded = [encode_prompt(run, p) for p in req.prompts]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "system_fingerprint": run.checkpoint.path.name}
        backend.take_slot()
        if req.stream:  # the stream gives the slot back when it ends, however it ends
            return EventStream(stream_completion(run, req, encoded, head), backend.slots.release)
        try:
            return await until_disconnected(request, complete, run, req, encoded, head)
        finally:
            backend.slots.release()


def create_app(runs: RunSet, limits: Limits = Limits(), device: str | torch.device = "cpu",
               allowed_hosts: Optional[list[str]] = None, *, api_key: Optional[str] = None,
               checkpoint: str = "best") -> FastAPI:
    """The web app. allowed_hosts (Host header names) guards against DNS rebinding; with api_key, everything but
    the page itself needs `Authorization: Bearer API_KEY`."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="lmlab serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(ApiGuard, api_key=api_key)
    if allowed_hosts:  # added last, so it runs first: a request for a foreign host name gets no further
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    backend = Backend(runs, limits, device, checkpoint)
    app.state.generations = backend.slots
    add_error_handlers(app)
    add_dashboard_routes(app, backend)
    add_playground_routes(app, backend)
    add_openai_routes(app, backend)
    return app


class EventStream(StreamingResponse):
    """Server-sent events that call on_close when the response is over, however it ends: finished, failed, or
    cut off by a client that went away (even before the first event)."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def stream_completion(run: LoadedRun, req: CompletionRequest, encoded: list[list[int]], head: dict):
    """Server-sent events: one per chunk, then usage when asked, then [DONE]. Each token is generated in the
    threadpool, so the server keeps answering while it generates."""
    chunks = all_chunks(run, req, encoded)
    generated = 0
    try:
        while (chunk := await run_in_threadpool(next, chunks, None)) is not None:
            generated += len(chunk.tokens)
            yield _sse({**head, "choices": [choice_json(chunk, req.logprobs is not None)]})
        if req.include_usage:
            yield _sse({**head, "choices": [], "usage": usage_json(encoded, generated)})
        yield "data: [DONE]\n\n"
    except Exception as e:  # the headers are sent: the error goes into the stream, as OpenAI's does
        error = e if isinstance(e, ApiError) else ApiError(500, f"{type(e).__name__}: {e}", kind="server_error")
        yield _sse(error.body())
    finally:
        chunks.close()  # a cancelled stream is only cancelled once the token in the threadpool is done


# ---------------------------------------------------------------------------------------------------------------
# Running the server


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or an LmlabError that says why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise LmlabError(f"cannot listen on host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LmlabError(f"port {port} on {host} is in use; pick another with --port") from None
        raise LmlabError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def is_loopback(host: str) -> bool:
    """Whether an address to listen on is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def allowed_host_names(host: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The Host header names the server answers to: a loopback server's own names, else the address it listens
    on; plus the names given with --allowed-host. Any other name is a page that rebound a DNS name to us."""
    own = [f"[{host}]" if ":" in host else host] + (LOOPBACK_NAMES if is_loopback(host) else [])
    names = [n.strip().lower() for n in (*own, *extra)]
    return list(dict.fromkeys(n for n in names if n))


def check_exposure(host: str, api_key: Optional[str], extra_hosts: list[str] | tuple[str, ...]) -> None:
    """Refuse, with an LmlabError, settings that would serve the runs to other machines unguarded or unusable."""
    if api_key is not None and (not api_key or not api_key.isascii() or not api_key.isprintable()
                                or api_key.strip() != api_key):
        raise LmlabError("--api-key must be printable ASCII, not empty, without leading or trailing spaces")
    if is_loopback(host):
        return
    if api_key is None:
        raise LmlabError(f"--host {host} can be reached from other machines; set a key they must send with "
                         f"--api-key KEY (or the environment variable LMLAB_API_KEY)")
    try:
        wildcard = ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard and not extra_hosts:
        raise LmlabError(f"--host {host} listens on every address; name the host names clients use to reach it "
                         f"with --allowed-host NAME (one option per name)")


def serve(sources: list[str], host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          device: str | torch.device = "cpu", api_key: Optional[str] = None,
          allowed_hosts: list[str] | tuple[str, ...] = (), checkpoint: str = "best") -> None:
    """Serve the runs until Ctrl-C, each from its best checkpoint (or the last). A non-loopback host needs an API
    key."""
    import uvicorn

    check_exposure(host, api_key, allowed_hosts)
    runs = RunSet(sources)
    sock = listen_socket(host, port)
    names_allowed = allowed_host_names(host, allowed_hosts)
    app = create_app(runs, limits, device, names_allowed, api_key=api_key, checkpoint=checkpoint)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}/"
    names = list(runs.current())
    what = (f"{len(names)} run{'s' * (len(names) != 1)} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
            if names else "no runs yet (new ones appear as training starts them)")
    print(f"lmlab serve: {what} at {url} (API: {url}v1); Ctrl-C stops", file=sys.stderr, flush=True)
    if not is_loopback(host):
        print(f"lmlab serve: listening beyond this machine: requests need the API key and one of the host names "
              f"{', '.join(names_allowed)}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass

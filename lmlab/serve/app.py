"""`lmlab serve`: a local web app that shows runs learning (live charts, probes) and lets people play with
next-token prediction, plus an OpenAI-compatible completions API. It reads run folders; nothing imports it.

    GET  /                    the dashboard and the playground (static files in lmlab/serve/static, no build step)
    GET  /api/runs            the runs served, with their status and latest numbers
    GET  /api/log             the metrics.jsonl, probes.jsonl or inside.jsonl records of a run added since the
                              client's last poll
    POST /api/next            the next-token distribution of a prompt under sampling settings, and one sampled token
    POST /api/surprisal       per-token surprisal of a text
    GET  /v1/models           the runs that have a checkpoint, as OpenAI models (id = run name)
    POST /v1/completions      OpenAI's completions schema, streamed as server-sent events when asked
    POST /v1/chat/completions OpenAI's chat completions, for runs fine-tuned on conversations; streamed when asked

This module builds the app from its parts (request: limits and refusals; runs; guard; completions; chat_completions;
playground) and runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import rundir
from ..run import LoadedRun
from ..common import LmlabError, json_safe
from .chat_completions import complete_chat, parse_chat_request, prompt_of, stream_chat
from .completions import (EventStream, complete, encode_prompts, parse_completion_request, parse_sampling,
                          stream_completion)
from .guard import ApiGuard, allowed_host_names, check_exposure, is_loopback
from .playground import MAX_TOP, next_token_view, surprisal_view
from .request import ApiError, Limits, check_length, choice_param, number_param, read_json_body
from .runs import Models, RunSet, Tails, has_checkpoint, run_summary

STATIC = Path(__file__).resolve().parent / "static"
DISCONNECT_POLL_S = 0.1  # how often a generation that is not streamed checks that its client is still there
LOGS = {"metrics": rundir.METRICS, "probes": rundir.PROBES, "inside": rundir.INSIDE,
        "completions": rundir.COMPLETIONS}


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
    text = choice_param(body, field, str, "", "a string")
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
        top = number_param(body, "top", 20, 1, MAX_TOP, integer=True)
        sample = choice_param(body, "sample", bool, False, "true or false")
        seed = number_param(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True)
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
    """OpenAI's models, completions and chat completions endpoints."""
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

    async def respond(request: Request, stream: bool, events, whole: Callable, *args):
        """Answer with the events of a stream, or with whole(*args) run until its client hangs up; a slot of
        --max-concurrent is held until either is over."""
        backend.take_slot()
        if stream:  # the stream gives the slot back when it ends, however it ends
            return EventStream(events(*args), backend.slots.release)
        try:
            return await until_disconnected(request, whole, *args)
        finally:
            backend.slots.release()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_completion_request(await read_json_body(request, backend.max_body), backend.limits)
        run = await run_in_threadpool(backend.loaded, req.model)
        encoded = encode_prompts(run, req)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "system_fingerprint": run.checkpoint.path.name}
        return await respond(request, req.stream, stream_completion, complete, run, req, encoded, head)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat_request(await read_json_body(request, backend.max_body), backend.limits)
        run = await run_in_threadpool(backend.loaded, req.model)
        prompt = await run_in_threadpool(prompt_of, run, req)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model,
                "system_fingerprint": run.checkpoint.path.name, "turns_dropped": prompt.turns_dropped}
        return await respond(request, req.stream, stream_chat, complete_chat, run, req, prompt, head)


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

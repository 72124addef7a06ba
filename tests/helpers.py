"""Shared helpers for the tokenizer, data, checkpoint and CLI tests: synthetic corpora, tiny configs, CLI runs."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "her brother", "our neighbour"]
VERBS = ["sees", "likes", "finds", "carries", "watches", "follows", "paints", "remembers"]
OBJECTS = ["the ball", "a red apple", "the river", "a book", "the garden", "some bread", "the blue door", "a letter"]
ENDINGS = [".", "!", "?", ", and then it rains.", " every morning.", " near the house."]


def make_text(n_lines: int = 200, seed: int = 0, extra: str = "") -> str:
    """A few KB of English-ish text: the same kinds of sentences with variations, one per line."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
        if i % 7 == 0:
            s = s.capitalize()
        lines.append(s)
    return "\n".join(lines) + "\n" + extra


def write_corpus(path: Path, n_lines: int = 200, seed: int = 0, extra: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(make_text(n_lines, seed, extra), encoding="utf-8")
    return path


# A ceiling against hangs for every subprocess and wait in the tests, never a speed check: a slow or loaded machine
# finishes well inside it.
HANG_S = 600

# Tiny settings for CLI training runs (max-time 0 turns off the preset's time budget).
TINY_ARGS = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
    "--max-steps", "20", "--max-time", "0", "--eval-interval", "10", "--sample-tokens", "20",
]


def tiny_config(data: str | Path, out: str | Path, **overrides):
    """A TrainConfig for a very small, fast run on CPU (keyword overrides: TrainConfig fields, or model_/optim_/data_
    prefixed fields of the nested configs)."""
    from lmlab.data import DataConfig
    from lmlab.model import ModelConfig
    from lmlab.optim import OptimConfig
    from lmlab.train import TrainConfig

    model = dict(block_size=16, n_layer=1, n_head=2, n_embd=16)
    optim = dict(optimizer="adamw", lr=3e-3, schedule="constant", warmup=5)
    data_kw = dict(data=str(data), tokenizer="char")
    top = dict(out=str(out), max_steps=20, max_time=0.0, batch_size=4, eval_interval=10, checkpoint_interval=1000,
               sample_tokens=0, device="cpu", progress=False)
    for key, value in overrides.items():
        if key.startswith("model_"):
            model[key[len("model_"):]] = value
        elif key.startswith("optim_"):
            optim[key[len("optim_"):]] = value
        elif key.startswith("data_"):
            data_kw[key[len("data_"):]] = value
        else:
            top[key] = value
    return TrainConfig(data=DataConfig(**data_kw), model=ModelConfig(**model), optim=OptimConfig(**optim), **top)


def stage_config(stage: str, base: str | Path, data: str, out: str | Path, val_data: str | None = None, **overrides):
    """A small fine-tuning run (--stage sft or dpo) of a base: the stage's defaults, a few steps, no extras."""
    import dataclasses

    from lmlab.config import get_preset

    cfg = get_preset("tiny", stage)
    settings = dict(init_from=str(base), out=str(out), max_steps=8, max_time=0.0, batch_size=4, eval_interval=4,
                    checkpoint_interval=4, sample_tokens=0, progress=False, device="cpu", inside=False,
                    trajectory_snapshots=0, telemetry_interval=0, tensorboard=False, probe=False, compile=False)
    settings.update(overrides)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data=data, val_data=val_data), **settings)


def crash_test(stage: str, workdir: Path, kills: int = 3, steps: int = 40) -> None:
    """scripts/crash_test.py on a stage: kill -9 a run `kills` times, resume it, compare with an uninterrupted one."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "crash_test.py"), "--stage", stage, "--kills",
                           str(kills), "--steps", str(steps), "--workdir", str(workdir)],
                          cwd=str(repo), env=cli_env(), capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert "PASS" in proc.stdout and stage in proc.stdout, proc.stdout


def cli_env(cache: str | Path | None = None) -> dict:
    env = os.environ.copy()
    if cache is not None:
        env["LMLAB_CACHE"] = str(cache)
    env.pop("LMLAB_DEBUG", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONUTF8"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def lmlab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmlab", *args]


def run_cli(args, cwd, cache=None, timeout=HANG_S) -> subprocess.CompletedProcess:
    """Run `python -m lmlab ARGS` in cwd with its own cache; returns the completed process (text mode)."""
    return subprocess.run(lmlab_cmd(*args), cwd=str(cwd), env=cli_env(cache), capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class ServerThread:
    """A real uvicorn server for an app, on a free loopback port, in a thread: `with ServerThread(app) as url:`."""

    def __init__(self, app):
        import uvicorn

        from lmlab.serve.app import listen_socket

        self.sock = listen_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + HANG_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def http(url: str, payload=None, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a POST of payload (as JSON) or raw data."""
    import json
    import urllib.error
    import urllib.request

    if payload is not None:
        data = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=HANG_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body.startswith(b"{") else {"text": body.decode()}


def serving(root, limits, **kw):
    """`with serving(root, limits) as (url, app):` lmlab serve's app for the runs in root, in a ServerThread."""
    import contextlib

    from lmlab.serve.app import create_app
    from lmlab.serve.runs import RunSet

    @contextlib.contextmanager
    def context():
        app = create_app(RunSet([root]), limits, **kw)
        with ServerThread(app) as url:
            yield url, app

    return context()


def openai_client(url: str, api_key: str = "unused"):
    """The official openai client for a test server, which never retries."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def request_under_way(url: str, path: str, payload: dict, started):
    """POST payload to url + path over a raw connection and wait until started() says the work is under way; the
    connection is returned, for the test to close: a client that hangs up before its answer."""
    import json
    import socket
    import time

    body = json.dumps(payload).encode()
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=HANG_S)
    conn.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), url[7:].encode(), len(body), body))
    deadline = time.monotonic() + HANG_S
    while not started() and time.monotonic() < deadline:
        time.sleep(0.01)
    return conn

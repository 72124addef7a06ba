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

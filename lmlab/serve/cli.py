"""`lmlab serve`: its options, and the command that checks them and starts the server."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import tyro
from typing_extensions import Annotated

from ..cli import parse
from ..common import LmlabError, resolve_device


@dataclass
class ServeArgs:
    """Serve runs in a local web app (dashboard and playground) and as an OpenAI-compatible completions API."""

    runs: Annotated[list[str], tyro.conf.Positional, tyro.conf.arg(metavar="[RUNS_DIR | RUN ...]")] = field(
        default_factory=lambda: ["runs"])
    """Run directories, or folders whose subfolders are runs (new runs in them show up as they start)."""
    host: str = "127.0.0.1"
    """Address to listen on; the default is reachable from this machine only (any other needs --api-key)."""
    port: int = 8000
    """Port to listen on (0: any free port)."""
    api_key: Annotated[Optional[str], tyro.conf.arg(metavar="KEY")] = None
    """A key every API request must send (Authorization: Bearer KEY); default: $LMLAB_API_KEY, else none."""
    allowed_host: Annotated[list[str], tyro.conf.UseAppendAction, tyro.conf.arg(metavar="NAME")] = field(
        default_factory=list)
    """A host name clients reach the server by, answered besides the address listened on."""
    max_tokens: int = 512
    """The most tokens one completion may generate."""
    max_prompt_chars: int = 20_000
    """The most characters of prompt (or of text to score) one request may send."""
    max_concurrent: int = 4
    """Requests running a model at the same time; one more is refused with HTTP 429."""
    checkpoint: Literal["best", "last"] = "best"
    """Which checkpoint of each run to serve: best (the lowest validation loss; an rl run's highest held-out reward) or last (the newest)."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""


def cmd_serve(argv: list[str]) -> int:
    from .app import serve
    from .request import Limits

    args = parse(ServeArgs, argv, "lmlab serve")
    if not 0 <= args.port <= 65535:
        raise LmlabError(f"--port must be in 0..65535, got {args.port}")
    if min(args.max_tokens, args.max_prompt_chars, args.max_concurrent) <= 0:
        raise LmlabError("--max-tokens, --max-prompt-chars and --max-concurrent must be positive")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LMLAB_API_KEY") or None
    serve(args.runs, args.host, args.port, Limits(args.max_tokens, args.max_prompt_chars, args.max_concurrent),
          resolve_device(args.device), api_key, args.allowed_host, args.checkpoint)
    return 0

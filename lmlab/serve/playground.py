"""The playground of `lmlab serve` (POST /api/next and /api/surprisal): the next-token distribution of a prompt under
sampling settings, with one token drawn the way generation draws it, and the surprisal of every token of a text."""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import torch

from ..run import LoadedRun
from ..common import LmlabError
from ..predict import next_token_distribution, surprisal
from ..sample import generate, sampling_probs, text_banned
from .completions import Sampling, encode_prompt, make_generator
from .request import ApiError

MAX_TOP = 100  # bars of the playground's distribution


@torch.inference_mode()
def sample_next(run: LoadedRun, prompt: str, s: Sampling, generator: torch.Generator) -> dict:
    """Draw one next token the way generation does, with its probability under the sampling settings and under
    the plain model."""
    banned = text_banned(run.tokenizer)
    token, logits = next(generate(run.model, encode_prompt(run, prompt), 1, s.temperature, s.top_k, s.top_p, generator,
                                  with_logits=True, banned=banned))
    logits = logits.float()
    drawn = logits.clone()
    drawn[banned] = float("-inf")
    sampled = float(sampling_probs(drawn, s.temperature, s.top_k, s.top_p)[token])
    return {"token_id": token, "text": run.tokenizer.decode([token]), "probability": sampled,
            "model_probability": float(logits.softmax(-1)[token])}


def next_token_view(run: LoadedRun, prompt: str, s: Sampling, top: int, sample: bool, seed: Optional[int]) -> dict:
    """The top tokens after the prompt (predict.next_token_distribution) and, when asked, one token drawn the way
    generation draws it."""
    try:
        rows = next_token_distribution(run.model, run.tokenizer, prompt, top, s.temperature, s.top_k, s.top_p,
                                       text_banned(run.tokenizer))
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

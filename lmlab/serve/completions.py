"""OpenAI's completions for `lmlab serve` (POST /v1/completions): the request checked against OpenAI's schema and the
server's limits (prompts as text or as token ids), then each choice generated as chunks of text (held back where a
stop string may begin), with logprobs when asked, after the prompt and its log-probabilities when echoed (what
harnesses such as lm-eval score with), answered whole or streamed as server-sent events. Each request samples with
its own torch.Generator and KV cache; the model is shared read-only."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional

import torch
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from ..run import LoadedRun
from ..common import LmlabError
from ..converse import Answer
from ..evaluate import stream_logprobs
from ..sample import find_stop, generate, prompt_ids, stop_prefix_length, text_banned
from .request import ApiError, ClientGone, Limits, check_length, choice_param, number_param

MAX_CHOICES = 16  # prompts x n in one request
MAX_LOGPROBS = 20
MAX_STOPS = 4


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def parse_sampling(body: dict) -> Sampling:
    """temperature in [0, 2] (0: greedy), top_k >= 0 (0: off), top_p in (0, 1] (1: off)."""
    return Sampling(float(number_param(body, "temperature", 1.0, 0.0, 2.0)),
                    number_param(body, "top_k", 0, 0, 1 << 31, integer=True),
                    float(number_param(body, "top_p", 1.0, 0.0, 1.0, low_open=True)))


@dataclass(frozen=True)
class GenerationRequest:
    """What a completion and a chat completion ask alike (generation_params)."""

    model: str
    sampling: Sampling
    max_tokens: int = 16
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    stream: bool = False
    include_usage: bool = False
    logprobs: Optional[int] = None
    """How many of the most likely tokens to list at each position; None: no logprobs."""


@dataclass(frozen=True)
class CompletionRequest(GenerationRequest):
    prompts: list[str | list[int]] = field(default_factory=list)
    """Each prompt as text or as token ids."""
    echo: bool = False
    """Whether each choice starts with its prompt (and the prompt's log-probabilities, when logprobs are asked)."""


# Parameters of OpenAI's schema that lmlab does not implement, with the one value that means "not used".
NEUTRAL = {"best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
           "suffix": None}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
         "stream_options", "logprobs", "echo", "user", *NEUTRAL}


def check_names(body: Any, known: set[str], neutral: dict) -> dict:
    """The body as a JSON object whose parameters lmlab knows, those it does not implement at their neutral value."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"unrecognized request argument: {unknown[0]}", unknown[0])
    for name, value_when_unused in neutral.items():
        value = body.get(name)
        if value is not None and value != value_when_unused:
            raise ApiError(400, f"{name} is not supported by lmlab serve (only {json.dumps(value_when_unused)})",
                           name)
    return body


def generation_params(body: dict, limits: Limits, max_tokens_name: str = "max_tokens",
                      default_max_tokens: int = 16) -> dict:
    """What a completion and a chat completion ask alike: the model, the sampling, the most tokens per choice
    (body[max_tokens_name]), n, stop strings, seed, and whether and how to stream."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: the name of a run (GET /v1/models lists them)", "model")
    max_tokens = number_param(body, max_tokens_name, default_max_tokens, 0, 1 << 31, integer=True)
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"{max_tokens_name} is {max_tokens:,}; this server generates at most "
                            f"{limits.max_tokens:,} tokens per completion (lmlab serve --max-tokens)", max_tokens_name,
                       "max_tokens_too_large")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOPS} strings", "stop")
    stream = choice_param(body, "stream", bool, False, "true or false")
    options = choice_param(body, "stream_options", dict, {}, "an object")
    if options and not stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
    choice_param(body, "user", str, None, "a string")
    return dict(model=model, sampling=parse_sampling(body), max_tokens=max_tokens,
                n=number_param(body, "n", 1, 1, MAX_CHOICES, integer=True), stop=tuple(s for s in stops if s),
                seed=number_param(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True), stream=stream,
                include_usage=choice_param(options, "include_usage", bool, False, "true or false"))


def parse_completion_request(body: Any, limits: Limits) -> CompletionRequest:
    """Check a /v1/completions body against OpenAI's schema and the server's limits."""
    body = check_names(body, KNOWN, NEUTRAL)
    params = generation_params(body, limits)
    prompts = parse_prompts(body.get("prompt", ""))
    check_length("prompt", sum(len(p) for p in prompts), limits)  # a token id counts as a character
    if params["n"] * len(prompts) > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n={params['n']} asks for more than {MAX_CHOICES} completions",
                       "n")
    return CompletionRequest(prompts=prompts, logprobs=number_param(body, "logprobs", None, 0, MAX_LOGPROBS,
                                                                    integer=True),
                             echo=choice_param(body, "echo", bool, False, "true or false"), **params)


def parse_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's four shapes of prompt as a list of prompts: a string, a list of strings, a list of token ids, or a
    list of lists of token ids."""
    def is_ids(p: Any) -> bool:
        return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

    if isinstance(prompt, str):
        return [prompt]
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt) or all(map(is_ids, prompt))):
        return prompt
    raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists of token "
                        "ids, none of the lists empty", "prompt")


def encode_prompt(run: LoadedRun, prompt: str) -> list[int]:
    try:
        return prompt_ids(run.tokenizer, prompt)
    except LmlabError as e:
        raise ApiError(400, f"the prompt cannot be encoded by this run's tokenizer: {e}", "prompt") from None


def encode_text_prompt(run: LoadedRun, prompt: str) -> list[int]:
    """A completions prompt's text: a special token's string (<|endoftext|>) is that token, as the export's tokenizer
    in transformers and OpenAI's completions read it (lm-eval's text requests start with its prefix token, decoded);
    the text between them is encoded by the run's tokenizer."""
    specials = run.tokenizer.special_tokens
    if not any(s in prompt for s in specials):
        return encode_prompt(run, prompt)
    pattern = "(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")"
    pieces = [[specials[p]] if p in specials else encode_prompt(run, p) for p in re.split(pattern, prompt) if p]
    return [i for piece in pieces for i in piece]


def encode_prompts(run: LoadedRun, req: CompletionRequest) -> list[list[int]]:
    """The token ids of each prompt: a text encoded by the run's tokenizer (encode_text_prompt), token ids checked
    against its vocabulary (special tokens such as the end of text included)."""
    vocab = run.tokenizer.vocab_size
    for ids in (p for p in req.prompts if not isinstance(p, str)):
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"the prompt has token id {bad}, which is not in this run's vocabulary (ids 0 to "
                                f"{vocab - 1})", "prompt")
    return [encode_text_prompt(run, p) if isinstance(p, str) else list(p) for p in req.prompts]


def prompt_text(run: LoadedRun, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else run.tokenizer.decode(prompt)


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
    token_id: int = -1
    top_ids: Optional[list[tuple[int, float]]] = None
    """The most likely tokens as (id, logprob), most likely first (top has them by label)."""


@dataclass
class Chunk:
    """A piece of one choice's text with the tokens generated for it; the last piece has a finish_reason."""

    index: int
    text: str
    tokens: list[TokenInfo]
    finish_reason: Optional[str] = None
    hidden: int = 0
    """Tokens generated that are neither text nor in tokens: the end of a chat model's turn."""
    echoed: int = 0
    """Tokens at the start of tokens that are the prompt's, echoed, not generated."""


def _set_logprobs(info: TokenInfo, tokenizer, logprob: float, top_ids: list[int], top_values: list[float]) -> None:
    info.logprob = logprob
    info.top_ids = list(zip(top_ids, top_values))
    info.top = {token_label(tokenizer, i): v for i, v in info.top_ids}


@torch.inference_mode()
def _token_info(tokenizer, logits: torch.Tensor, token_id: int, offset: int, top: Optional[int]) -> TokenInfo:
    info = TokenInfo(token_label(tokenizer, token_id), offset, token_id=token_id)
    if top is not None:
        logp = logits.float().log_softmax(-1)
        values, ids = logp.topk(min(top, logp.numel()))
        _set_logprobs(info, tokenizer, float(logp[token_id]), ids.tolist(), values.tolist())
    return info


def echo_chunk(run: LoadedRun, ids: list[int], text: str, top: Optional[int],
               cancel: Optional[threading.Event] = None) -> Chunk:
    """The prompt at the start of a choice that echoes it: its text, and its tokens with their offsets in it and, when
    logprobs are asked for (top is not None), their log-probabilities under the model, the first token's null (nothing
    predicts it). A prompt longer than the context is scored in windows of the context, each token once, by
    evaluate's rule for `lmlab eval --stride BLOCK` (stride = context: lm-eval's own hf backend windows so)."""
    if cancel is not None and cancel.is_set():
        raise ClientGone()
    decoder, tokens, offset = run.tokenizer.stream_decoder(), [], 0
    for token_id in ids:
        tokens.append(TokenInfo(token_label(run.tokenizer, token_id), offset, token_id=token_id))
        offset += len(decoder.push(token_id))
    if top is not None and len(ids) > 1:
        block = run.model.cfg.block_size
        logp, top_ids, top_values = (c.tolist() for c in stream_logprobs(run.model, ids, block, block, top))
        for info, *scores in zip(tokens[1:], logp, top_ids, top_values):
            _set_logprobs(info, run.tokenizer, *scores)
    return Chunk(0, text, tokens, echoed=len(tokens))


def completion_chunks(run: LoadedRun, ids: list[int], prompt_chars: int, req: CompletionRequest,
                      generator: torch.Generator, index: int = 0,
                      cancel: Optional[threading.Event] = None, chat: bool = False) -> Iterator[Chunk]:
    """One completion as chunks; joined, they are the completion. Chunks end on token boundaries, except where a
    stop string cuts the text; text that could be the start of a stop string is held back until it is known not to
    be. The last chunk says why generation ended ("stop" or "length") and lists every token generated, including
    those that made up the stop string (which is not part of the text). Once cancel is set, ClientGone is raised
    before the next token is generated. With chat, this is a chat model's answer (converse.Answer): special tokens
    may be drawn, and the end of its turn ends it ("stop"), counted in the last chunk's `hidden`."""
    decoder = run.tokenizer.stream_decoder()
    s = req.sampling
    answer = Answer(run.model, run.tokenizer, ids, req.max_tokens, s.temperature, s.top_k, s.top_p, generator,
                    with_logits=True) if chat else None
    tokens = iter(answer) if chat else generate(run.model, ids, req.max_tokens, s.temperature, s.top_k, s.top_p,
                                                generator, with_logits=True, banned=text_banned(run.tokenizer))
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
    ended = chat and answer.finish_reason == "stop"
    yield Chunk(index, held if cut is None else held[:cut], held_tokens,
                "length" if cut is None and not ended else "stop", int(ended))


def make_generator(seed: Optional[int]) -> torch.Generator:
    """A request's own random numbers: from its seed (any 64-bit integer), else from the OS."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % (1 << 64))
    return generator


def all_chunks(run: LoadedRun, req: CompletionRequest, encoded: list[list[int]],
               cancel: Optional[threading.Event] = None, chat: bool = False) -> Iterator[Chunk]:
    """Every choice's chunks: prompt by prompt, n choices each, all from one generator seeded once, each after its
    prompt when echoed (with chat, the answers of a chat model to its one prompt, whose text has no offsets).
    Generation after a prompt longer than the context sees its last block_size tokens, as sample.generate does."""
    generator = make_generator(req.seed)
    for p, ids in enumerate(encoded):
        text = "" if chat else prompt_text(run, req.prompts[p])
        echoed = echo_chunk(run, ids if text else [], text, req.logprobs, cancel) if not chat and req.echo else None
        for j in range(req.n):
            if echoed is not None:
                yield replace(echoed, index=p * req.n + j)
            yield from completion_chunks(run, ids, len(text), req, generator, p * req.n + j, cancel, chat)


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


def joined_chunks(chunks: Iterator[Chunk]) -> list[Chunk]:
    """The chunks a stream would send, joined per choice: each choice's whole text, tokens and finish reason."""
    choices: dict[int, Chunk] = {}
    for chunk in chunks:
        choice = choices.setdefault(chunk.index, Chunk(chunk.index, "", []))
        choice.text += chunk.text
        choice.tokens += chunk.tokens
        choice.finish_reason = chunk.finish_reason or choice.finish_reason
        choice.hidden += chunk.hidden
        choice.echoed += chunk.echoed
    return list(choices.values())


def generated(chunks: list[Chunk]) -> int:
    """The tokens generated for the chunks, for the usage."""
    return sum(len(c.tokens) - c.echoed + c.hidden for c in chunks)


def complete(run: LoadedRun, req: CompletionRequest, encoded: list[list[int]], head: dict,
             cancel: Optional[threading.Event] = None) -> dict:
    """The response to a request that is not streamed."""
    choices = joined_chunks(all_chunks(run, req, encoded, cancel))
    return {**head, "choices": [choice_json(c, req.logprobs is not None) for c in choices],
            "usage": usage_json(encoded, generated(choices))}


# ---------------------------------------------------------------------------------------------------------------
# Streaming


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


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


def stream_completion(run: LoadedRun, req: CompletionRequest, encoded: list[list[int]], head: dict):
    """Server-sent events: one per chunk, then usage when asked, then [DONE]."""
    return stream_chunks(all_chunks(run, req, encoded), lambda chunk: [choice_json(chunk, req.logprobs is not None)],
                         req.include_usage, encoded, head)


async def stream_chunks(chunks: Iterator[Chunk], choices: Callable[[Chunk], list[dict]], include_usage: bool,
                        encoded: list[list[int]], head: dict):
    """Server-sent events: for each chunk, one per item of choices(chunk), then usage when asked, then [DONE].
    Each token is generated in the threadpool, so the server keeps answering while it generates."""
    count = 0  # tokens generated
    try:
        while (chunk := await run_in_threadpool(next, chunks, None)) is not None:
            count += generated([chunk])
            for choice in choices(chunk):
                yield _sse({**head, "choices": [choice]})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": usage_json(encoded, count)})
        yield "data: [DONE]\n\n"
    except Exception as e:  # the headers are sent: the error goes into the stream, as OpenAI's does
        error = e if isinstance(e, ApiError) else ApiError(500, f"{type(e).__name__}: {e}", kind="server_error")
        yield _sse(error.body())
    finally:
        chunks.close()  # a cancelled stream is only cancelled once the token in the threadpool is done

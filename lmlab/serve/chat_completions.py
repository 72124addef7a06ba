"""OpenAI's chat completions for `lmlab serve` (POST /v1/chat/completions): the messages rendered with the run's
chat template (converse.chat_prompt: the oldest turns left out to fit the context, and counted in the response's
turns_dropped), then each choice generated as completions.py generates text, until the model ends its turn or
max_tokens; answered whole (chat.completion) or streamed (chat.completion.chunk: the role, then pieces of content,
then the finish reason). Only a run fine-tuned on conversations (stage sft) answers; a text model's request gets 400.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from ..chat import ConversationTooLong, check_messages
from ..run import LoadedRun
from ..common import LmlabError
from ..converse import ChatPrompt, NotAChatModel, chat_prompt, check_chat_run
from .completions import (MAX_LOGPROBS, Chunk, GenerationRequest, TokenInfo, all_chunks, check_names, generated,
                          generation_params, joined_chunks, stream_chunks, token_label, usage_json)
from .request import ApiError, Limits, check_length, choice_param, number_param


@dataclass(frozen=True)
class ChatRequest(GenerationRequest):
    messages: list[dict] = field(default_factory=list)
    """Checked by chat.check_messages: an optional system message, then user and assistant in turn, ending with
    the user's. (logprobs is top_logprobs, 0 when absent, when logprobs is true.)"""


# Parameters of OpenAI's schema that lmlab does not implement, with the one value that means "not used".
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "tools": [], "tool_choice": "none",
           "response_format": {"type": "text"}, "store": False}
KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stop",
         "seed", "stream", "stream_options", "logprobs", "top_logprobs", "user", *NEUTRAL}


def read_messages(value: Any) -> list[dict]:
    """The request's messages as chat.check_messages wants them: a "developer" message is a system message, and a
    content of text parts ([{"type": "text", "text": ...}]) is their text joined."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    messages = []
    for number, message in enumerate(value, 1):
        if isinstance(message, dict):
            message = {**message, "role": "system" if message.get("role") == "developer" else message.get("role")}
            parts = message.get("content")
            if isinstance(parts, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in parts):
                    raise ApiError(400, f"message {number}: lmlab reads text content parts only ({{\"type\": "
                                        f"\"text\", \"text\": ...}})", "messages")
                message["content"] = "".join(p["text"] for p in parts)
        messages.append(message)
    try:
        return check_messages(messages, last="user")
    except LmlabError as e:
        raise ApiError(400, str(e), "messages") from None


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """Check a /v1/chat/completions body against OpenAI's schema and the server's limits. max_completion_tokens
    (or the older max_tokens) defaults to the most the server generates, so that an answer can end its turn."""
    body = check_names(body, KNOWN, NEUTRAL)
    both = [body.get(n) for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None]
    if len(both) == 2 and both[0] != both[1]:
        raise ApiError(400, "max_completion_tokens and max_tokens differ; send one of them", "max_tokens")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params = generation_params(body, limits, name, limits.max_tokens)
    messages = read_messages(body.get("messages"))
    check_length("messages", sum(len(m["content"]) for m in messages), limits)
    logprobs = choice_param(body, "logprobs", bool, False, "true or false")
    top = number_param(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
    if top is not None and not logprobs:
        raise ApiError(400, "top_logprobs is only allowed with logprobs: true", "top_logprobs")
    return ChatRequest(messages=messages, logprobs=(top or 0) if logprobs else None, **params)


def prompt_of(run: LoadedRun, req: ChatRequest) -> ChatPrompt:
    """The prompt for the request's answers, or the ApiError that refuses it: the run is not a chat model, the
    latest turn alone does not fit the context, or the tokenizer cannot encode the text."""
    try:
        check_chat_run(run, repr(req.model), "it continues text at POST /v1/completions")
    except NotAChatModel as e:
        raise ApiError(400, f"the model {e}", "model", "model_not_chat") from None
    try:
        return chat_prompt(run.tokenizer, req.messages, run.model.cfg.block_size, req.max_tokens)
    except LmlabError as e:
        raise ApiError(400, f"the messages cannot be answered by this model: {e}", "messages",
                       "context_length_exceeded" if isinstance(e, ConversationTooLong) else None) from None


# ---------------------------------------------------------------------------------------------------------------
# Responses


def _logprob(tokenizer, token_id: int, logprob: Optional[float]) -> dict:
    return {"token": token_label(tokenizer, token_id), "logprob": logprob,
            "bytes": list(tokenizer.decode_bytes([token_id]))}


def logprobs_json(tokenizer, tokens: list[TokenInfo]) -> dict:
    """The chat API's logprobs: for each token of the content, its log-probability under the model (temperature
    1, no filters), its bytes, and the most likely tokens at its position."""
    return {"content": [{**_logprob(tokenizer, t.token_id, t.logprob),
                         "top_logprobs": [_logprob(tokenizer, i, v) for i, v in t.top_ids or []]} for t in tokens],
            "refusal": None}


def message_choice(tokenizer, chunk: Chunk, logprobs: bool) -> dict:
    return {"index": chunk.index, "message": {"role": "assistant", "content": chunk.text, "refusal": None},
            "logprobs": logprobs_json(tokenizer, chunk.tokens) if logprobs else None,
            "finish_reason": chunk.finish_reason}


def delta_choices(tokenizer, chunk: Chunk, logprobs: bool, started: set[int]) -> list[dict]:
    """A chunk as the stream's choices: a choice's first says the role, then its content as it comes, then its
    finish reason with an empty delta."""
    out = []
    if chunk.index not in started:
        started.add(chunk.index)
        out.append({"index": chunk.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None})
    if chunk.text or chunk.tokens:
        out.append({"index": chunk.index, "delta": {"content": chunk.text},
                    "logprobs": logprobs_json(tokenizer, chunk.tokens) if logprobs else None, "finish_reason": None})
    if chunk.finish_reason:
        out.append({"index": chunk.index, "delta": {}, "logprobs": None, "finish_reason": chunk.finish_reason})
    return out


def complete_chat(run: LoadedRun, req: ChatRequest, prompt: ChatPrompt, head: dict,
                  cancel: Optional[threading.Event] = None) -> dict:
    """The response to a request that is not streamed."""
    choices = joined_chunks(all_chunks(run, req, [prompt.ids], cancel, chat=True))
    return {**head, "object": "chat.completion",
            "choices": [message_choice(run.tokenizer, c, req.logprobs is not None) for c in choices],
            "usage": usage_json([prompt.ids], generated(choices))}


def stream_chat(run: LoadedRun, req: ChatRequest, prompt: ChatPrompt, head: dict):
    """Server-sent chat.completion.chunk events, then usage when asked, then [DONE]."""
    started: set[int] = set()
    return stream_chunks(all_chunks(run, req, [prompt.ids], chat=True),
                         lambda chunk: delta_choices(run.tokenizer, chunk, req.logprobs is not None, started),
                         req.include_usage, [prompt.ids], {**head, "object": "chat.completion.chunk"})

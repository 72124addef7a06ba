"""Talking to a chat model: a conversation rendered with the generation prompt (its oldest turns left out to fit the
context, and counted), then the assistant's answer, generated until the model ends its turn or a token budget runs
out. `lmlab chat`, `lmlab sample --chat` and serve's /v1/chat/completions all answer through here.

Unlike a continuation of text (sample.text_banned), an answer may draw special tokens: a chat model ends its turn by
writing one of tokenizer.stop_ids (the end of a turn, the end of a text), which ends the answer and is not part of its
text. Only runs fine-tuned on conversations (stage sft) are chat models; a text model never learnt what a turn is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, TextIO, Union

import torch

from . import chat
from . import tokenizer as tok
from .common import LmlabError
from .config import TrainConfig
from .sample import SampleConfig, generate, stream_text


class NotAChatModel(LmlabError):
    """The run was trained on text only: it has no notion of a turn."""


def check_chat_run(config: TrainConfig, name: Union[str, Path], instead: str = "lmlab sample continues text") -> None:
    """Refuse, with NotAChatModel, a run that is not a chat model (TrainConfig.chat_model); `instead` says what the
    run can do."""
    stage = config.stage
    if not config.chat_model:
        raise NotAChatModel(f"{name} is a text model (stage {stage}), never fine-tuned on conversations, so it does "
                            f"not answer turns ({instead}); fine-tune it into a chat model first: lmlab train "
                            f"--stage sft --init-from RUN --data chats.jsonl")


def prompt_budget(block_size: int, max_new_tokens: int) -> int:
    """The most tokens a prompt keeps of the conversation: the context less room for the answer (at most half the
    context), so that the answer is written seeing the whole prompt."""
    return block_size - min(max_new_tokens, block_size // 2)


@dataclass
class ChatPrompt:
    """A conversation as the ids that ask the model for the assistant's next answer."""

    ids: list[int]
    """The rendered conversation, ending with the assistant's start of turn."""
    turns_dropped: int
    """How many of the oldest turns (a user message and its answer) were left out to fit the budget."""
    budget: int
    """The most tokens the prompt could keep (prompt_budget)."""


def chat_prompt(tokenizer: tok.Tokenizer, messages: list[dict], block_size: int, max_new_tokens: int) -> ChatPrompt:
    """The prompt for the answer to `messages` (an optional system message, then user and assistant in turn, ending
    with the user's): the oldest turns after the system message are left out until it fits prompt_budget.
    chat.ConversationTooLong (an LmlabError) when the system message and the last user message alone do not fit."""
    budget = prompt_budget(block_size, max_new_tokens)
    rendered = chat.render(tokenizer, messages, add_generation_prompt=True, max_tokens=budget)
    return ChatPrompt(rendered.ids.tolist(), rendered.turns_cut, budget)


class Answer:
    """One answer, generated as it is iterated: token ids, or (id, logits) pairs with with_logits (sample.generate's
    logits, before temperature and filters). The stop id that ends the turn is generated but not yielded. Once the
    iteration is over, finish_reason is "stop" (the model ended its turn) or "length" (max_new_tokens generated),
    and `generated` counts every token drawn, the stop id included."""

    def __init__(self, model: torch.nn.Module, tokenizer: tok.Tokenizer, prompt: list[int], max_new_tokens: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True, compile: bool = False,
                 with_logits: bool = False):
        self.model, self.tokenizer, self.prompt, self.max_new_tokens = model, tokenizer, prompt, max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                             use_cache=use_cache, compile=compile, with_logits=with_logits)
        self.finish_reason: Optional[str] = None
        self.generated = 0

    def __iter__(self) -> Iterator[Union[int, tuple[int, torch.Tensor]]]:
        stops = set(self.tokenizer.stop_ids)
        with_logits = self.sampling["with_logits"]
        tokens = generate(self.model, self.prompt, self.max_new_tokens, **self.sampling)
        try:
            for item in tokens:
                self.generated += 1
                if (item[0] if with_logits else item) in stops:
                    self.finish_reason = "stop"
                    return
                yield item
            self.finish_reason = "length"
        finally:
            tokens.close()


def sample_answer(run, settings: SampleConfig, out: TextIO) -> int:
    """`lmlab sample RUN --chat QUESTION`: the answer of a chat model to one user message, streamed to out."""
    check_chat_run(run.config, run.run_dir)
    prompt = chat_prompt(run.tokenizer, [{"role": "user", "content": settings.chat}], run.model.cfg.block_size,
                         settings.max_new_tokens)
    answer = Answer(run.model, run.tokenizer, prompt.ids, settings.max_new_tokens, settings.temperature,
                    settings.top_k, settings.top_p, torch.Generator().manual_seed(settings.seed),
                    use_cache=not settings.no_cache, compile=settings.compile)
    for piece in stream_text(run.tokenizer, iter(answer), settings.stop):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0

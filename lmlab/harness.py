"""EleutherAI's lm-evaluation-harness on an lmlab run (`lmlab eval RUN --tasks ...`): `LmlabLM`, an lm-eval `LM` over
the run's own model and tokenizer, and `run_tasks`, which runs tasks (lm-eval's, or those of task YAML files in
--include-path) on it. Importing this module needs lm-eval (pip install "lmlab[eval]"); nothing else imports it.

How requests are scored:
- loglikelihood(context, continuation): as lm-eval's own hf model does, whitespace at the end of the context moves to
  the continuation, context + continuation is encoded whole, and the continuation is what follows the context's own
  token count (so a token that spans the boundary counts as the continuation's). An empty context is the end-of-text
  token (lm-eval's prefix_token_id) for a run that has one; a run from before the special tokens has none, so its
  first continuation token is the context and is not scored. A pair longer than the context window keeps its
  rightmost block_size + 1 tokens. Pairs are scored in batches of --batch-size, longest first, padded on the right
  (the model is causal, so padding after a row changes nothing before it); is_greedy says whether every continuation
  token was the most likely one.
- loglikelihood_rolling(text): the text's tokens are scored exactly as `lmlab eval --stride BLOCK` scores a text
  (evaluate.stream_losses over non-overlapping windows); the first token, which eval leaves unpredicted, is scored
  after the end-of-text token when the run has one (lm-eval scores every token from a prefix), else it is not scored.
  So its bits per byte differ from eval's by that one token only.
- generate_until(context, gen_kwargs): sample.generate (greedy unless the task asks for a temperature), special
  tokens never drawn, cut at the first of the task's `until` strings or after max_gen_toks tokens; for a chat run
  (stage sft) the answer also ends where the model ends its turn (converse.Answer).

With --apply-chat-template, lm-eval renders each prompt with the run's chat template (chat.render_text) and the
special tokens it spells are encoded as their ids.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .common import LmlabError

INSTALL = 'pip install "lmlab[eval]" (or pip install lm-eval)'
try:
    from lm_eval.api.model import LM
except ImportError:
    raise LmlabError(f"--tasks runs EleutherAI's lm-evaluation-harness, which is not installed: {INSTALL}") from None

from . import chat  # noqa: E402 - after the check that lm-eval is there
from .converse import Answer  # noqa: E402
from .evaluate import stream_losses  # noqa: E402
from .sample import find_stop, generate, text_banned  # noqa: E402
from .tokenizer import ENDOFTEXT  # noqa: E402

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default when a task does not say


class LmlabLM(LM):
    """An lm-eval language model over a loaded run (run.load_run): see the module docstring."""

    def __init__(self, run, batch_size: int = 32, chat_template: bool = False):
        super().__init__()
        self.run, self.model, self.tokenizer = run, run.model, run.tokenizer
        self.block = run.model.cfg.block_size
        self.batch_size = max(1, batch_size)
        self.device_ = next(run.model.parameters()).device
        self.is_chat = run.config.chat_model
        self.prefix_token_id: Optional[int] = self.tokenizer.special_tokens.get(ENDOFTEXT)
        specials = sorted(self.tokenizer.special_tokens, key=len, reverse=True)
        # with the chat template on, the special tokens the template spells in a prompt are their ids
        self.specials_re = re.compile("|".join(map(re.escape, specials))) if chat_template and specials else None

    # -- tokens

    def encode(self, text: str) -> list[int]:
        """The ids of `text`; with the chat template on, the special tokens it spells as their ids."""
        if self.specials_re is None:
            return self.tokenizer.encode(text)
        ids, position = [], 0
        for match in self.specials_re.finditer(text):
            ids += self.tokenizer.encode(text[position:match.start()])
            ids.append(self.tokenizer.special_tokens[match.group(0)])
            position = match.end()
        return ids + self.tokenizer.encode(text[position:])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The context's and the continuation's ids (the module docstring says where the boundary falls)."""
        if not context:
            prefix = [] if self.prefix_token_id is None else [self.prefix_token_id]
            return prefix, self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, context_ids = self.encode(context + continuation), self.encode(context)
        continuation_ids = whole[len(context_ids):]
        if continuation and not continuation_ids:  # the boundary token swallowed the continuation
            continuation_ids = self.encode(continuation)
        return context_ids, continuation_ids

    # -- lm-eval's three requests

    @torch.no_grad()
    def score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether greedy decoding gives it) of each (context ids,
        continuation ids) pair."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        rows = []  # (index, input ids, target ids, how many of the last targets are scored)
        for i, (context, continuation) in enumerate(pairs):
            ids = (context + continuation)[-(self.block + 1):]
            scored = min(len(continuation), len(ids) - 1)
            if scored > 0:
                rows.append((i, ids[:-1], ids[1:], scored))
        rows.sort(key=lambda r: -len(r[1]))
        for b in range(0, len(rows), self.batch_size):
            batch = rows[b:b + self.batch_size]
            width = len(batch[0][1])
            x = torch.zeros(len(batch), width, dtype=torch.long)
            for j, (_, inputs, _, _) in enumerate(batch):
                x[j, :len(inputs)] = torch.tensor(inputs)
            logp = self.model(x.to(self.device_)).float().log_softmax(-1)  # (B, T, V)
            for j, (i, inputs, targets, scored) in enumerate(batch):
                at = torch.arange(len(inputs) - scored, len(inputs), device=logp.device)
                want = torch.tensor(targets[-scored:], device=logp.device)
                rows_logp = logp[j, at]  # (scored, V)
                results[i] = (float(rows_logp.gather(-1, want[:, None]).sum()),
                              bool((rows_logp.argmax(-1) == want).all()))
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.score_pairs([self.encode_pair(*r.args) for r in requests])

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        first = None  # log-probabilities of the first token after the prefix, one forward for every request
        if self.prefix_token_id is not None:
            x = torch.tensor([[self.prefix_token_id]], device=self.device_)
            first = self.model(x)[0, -1].float().log_softmax(-1)
        out = []
        for request in requests:
            ids = np.asarray(self.encode(request.args[0]), dtype=np.int64)
            total = 0.0
            if len(ids) and first is not None:
                total += float(first[int(ids[0])])
            if len(ids) > 1:  # the rest as `lmlab eval --stride BLOCK` scores it
                losses = stream_losses(self.model, ids, self.block, self.batch_size, stride=self.block)
                total -= float(losses.nats.double().sum())
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self.generate_one(*r.args) for r in requests]

    def generate_one(self, context: str, gen_kwargs: dict) -> str:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        until = tuple([until] if isinstance(until, str) else until)
        max_new = int(kwargs.get("max_gen_toks") or DEFAULT_MAX_GEN_TOKS)
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample", True) else 0.0
        prompt = self.encode(context) or ([] if self.prefix_token_id is None else [self.prefix_token_id])
        if not prompt:
            raise LmlabError("generate_until got an empty context and this run has no end-of-text token to start from")
        generator = torch.Generator().manual_seed(1234)
        if self.is_chat:  # until the model ends its turn
            tokens = iter(Answer(self.model, self.tokenizer, prompt, max_new, temperature, generator=generator))
        else:
            tokens = generate(self.model, prompt, max_new, temperature, generator=generator,
                              banned=text_banned(self.tokenizer))
        decoder, text = self.tokenizer.stream_decoder(), ""
        for token in tokens:
            text += decoder.push(token)
            if until and find_stop(text, until) is not None:
                break
        text += decoder.flush()
        at = find_stop(text, until) if until else None
        return text if at is None else text[:at]

    # -- chat templates

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return chat.render_text(self.tokenizer, chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return f"lmlab-{self.tokenizer.kind}-{self.tokenizer.fingerprint()[:16]}"

    def chat_template(self, chat_template=False) -> Optional[str]:
        return self.tokenizer.chat_template if chat_template else None


def task_manager(tasks: list[str], include_path: Optional[str]):
    """lm-eval's TaskManager for `tasks`, refusing in one line the names it does not know. Only the include path is
    indexed when it holds every task (indexing lm-eval's own thousands of tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise LmlabError(f"--include-path {include_path} is not a folder (of task YAML files)")
    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not all(t in manager.all_tasks for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        where = f"lm-eval's {len(manager.all_tasks):,} tasks" + (f" and {include_path}'s" if include_path else "")
        raise LmlabError(f"unknown task {', '.join(map(repr, unknown))}: not among {where} (a task YAML file's "
                         f"folder goes in --include-path)")
    return manager


def run_tasks(run, tasks: list[str], include_path: Optional[str] = None, num_fewshot: Optional[int] = None,
              limit: Optional[float] = None, apply_chat_template: bool = False, batch_size: int = 32) -> dict:
    """lm-eval's simple_evaluate of `tasks` on a loaded run; {task: {metric: value}} with each metric's standard
    error as METRIC_stderr where lm-eval gives one (a filter other than none stays in the name: "exact_match,flexible")."""
    from lm_eval import simple_evaluate

    if not tasks:
        raise LmlabError("--tasks needs at least one task name")
    if apply_chat_template and run.tokenizer.chat_template is None:
        raise LmlabError(f"--apply-chat-template: run {run.run_dir}'s tokenizer has no chat template (it is from "
                         f"before lmlab's special tokens)")
    manager = task_manager(tasks, include_path)
    lm = LmlabLM(run, batch_size, apply_chat_template)
    logging.getLogger("lm-eval").setLevel(logging.WARNING if not os.environ.get("LMLAB_DEBUG") else logging.INFO)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the results (--json)
            out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                  apply_chat_template=apply_chat_template, log_samples=False, verbosity=None)
    except LmlabError:
        raise
    except Exception as e:  # a task's data that cannot be read, offline, malformed YAML: one line
        if os.environ.get("LMLAB_DEBUG"):
            raise
        line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LmlabError(f"lm-eval failed: {type(e).__name__}: {line}") from None
    results = {}
    for task, row in (out or {}).get("results", {}).items():
        metrics = {}
        for key, value in row.items():
            if key == "alias" or "," not in key or not isinstance(value, (int, float)):
                continue  # the alias, and the "N/A" of a metric without a standard error
            name, filt = key.split(",", 1)
            metrics[name if filt == "none" else key] = value
        results[task] = metrics
    return results


def describe(results: dict) -> str:
    """The results as a table: a row per task and metric, the value and its standard error."""
    lines = [f"{'task':<24} {'metric':<24} {'value':>12} {'stderr':>10}"]
    for task, metrics in results.items():
        for name, value in metrics.items():
            base, _, filt = name.partition(",")
            if base.endswith("_stderr"):
                continue
            err = metrics.get(f"{base}_stderr" + (f",{filt}" if filt else ""))
            lines.append(f"{task:<24} {name:<24} {value:>12.4f} {'' if err is None else f'{err:10.4f}':>10}")
    return "\n".join(lines)

"""Talking to a chat model: serve's /v1/chat/completions through the official openai client, `lmlab chat` through
piped stdin and a pseudo-terminal, `lmlab sample --chat`, and the export's chat template and end of turn in
transformers. Each is held to an oracle: sample.generate on chat.render's ids (cut at the first stop id), a plain
forward's log_softmax, transformers itself.

The chat runs are tiny text runs made chat models the way SFT's run would mark them (its config's stage is sft), with
one change to their weights so that they end their turns: the head's row for the end of a turn is the newline's,
scaled by 1.5, so the model ends its turn where it would end a line of its corpus."""

from __future__ import annotations

import json
import os
import pty
import random
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import HANG_S, cli_env, http, lmlab_cmd, openai_client, request_under_way, serving, tiny_config, write_corpus
from lmlab import chat
from lmlab import tokenizer as tok
from lmlab.run import load_run
from lmlab.cli import main
from lmlab.sample import generate

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[test]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install -e .)")

import lmlab.converse  # noqa: E402
from lmlab.serve.request import Limits  # noqa: E402

LIMITS = Limits(max_tokens=48, max_prompt_chars=400, max_concurrent=3)
KEY = "sk-lmlab-chat-key"
QUESTION = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "the cat"}]


# ---------------------------------------------------------------------------------------------------------------
# Runs and oracles


def make_chat_model(run_dir: Path) -> None:
    """Mark a trained text run as a chat model (stage sft, as SFT writes it) that ends its turn where it would end a
    line: the head's row for <|end|> becomes 1.5 x the newline's, in every checkpoint (hashes rewritten)."""
    from safetensors.torch import load_file, save_file

    from lmlab.common import sha256_file
    from lmlab.run import Run

    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "stage": "sft", "chat": True}))
    tokenizer = Run(run_dir).tokenizer()
    end, newline = tokenizer.special_tokens[tok.END], tokenizer.encode("\n")[0]
    for checkpoint in sorted((run_dir / "checkpoints").iterdir()):
        weights = load_file(checkpoint / "model.safetensors")
        weights["lm_head.weight"][end] = 1.5 * weights["lm_head.weight"][newline]
        save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
        state = json.loads((checkpoint / "state.json").read_text())
        state["files"]["model.safetensors"] = sha256_file(checkpoint / "model.safetensors")
        (checkpoint / "state.json").write_text(json.dumps(state))


def chat_runs(tmp_path_factory, steps: int) -> Path:
    """A folder with a text run ("text", stage pretrain) and the same run as a chat model ("chat"), trained `steps`
    steps once per session."""
    root = tmp_path_factory.getbasetemp() / f"chat-runs-{steps}"
    done = root.with_name(root.name + ".done")
    if done.exists():
        return root
    from lmlab.train import train

    corpus = write_corpus(root.with_name(f"chat-corpus-{steps}.txt"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(tmp_path_factory.mktemp("chat-cache")))
        train(tiny_config(corpus, root / "text", model_block_size=128, model_n_embd=32, model_n_layer=2,
                          batch_size=8, max_steps=steps, eval_interval=steps, tensorboard=False,
                          trajectory_snapshots=0, probe=False))
    shutil.copytree(root / "text", root / "chat")
    make_chat_model(root / "chat")
    done.touch()
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """20 steps: enough for the oracles, which do not need good answers."""
    return chat_runs(tmp_path_factory, 20)


@pytest.fixture(scope="module")
def fluent(tmp_path_factory) -> Path:
    """150 steps (about 5 s): answers that end their turns where the corpus ends its lines."""
    return chat_runs(tmp_path_factory, 150)


@pytest.fixture(scope="module")
def model(runs):
    return load_run(runs / "chat")


def oracle(run, messages: list[dict], max_new_tokens: int, temperature: float, generator=None, **kw):
    """sample.generate on chat.render's ids, cut at the first stop id: (prompt ids, answer ids, finish reason)."""
    ids = chat.render(run.tokenizer, messages, add_generation_prompt=True).ids.tolist()
    answer = []
    for token in generate(run.model, ids, max_new_tokens, temperature, generator=generator, **kw):
        if token in run.tokenizer.stop_ids:
            return ids, answer, "stop"
        answer.append(token)
    return ids, answer, "length"


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# /v1/chat/completions


@pytest.fixture(scope="module")
def served(runs):
    with serving(runs, LIMITS) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served[0])


def ask(client, **kw):
    budget = {} if "max_completion_tokens" in kw else {"max_tokens": 30}
    return client.chat.completions.create(**{"model": "chat", "messages": QUESTION, "seed": 1, **budget, **kw})


def streamed(client, **kw) -> tuple[dict[int, str], dict[int, str], list, list]:
    """Content and finish reason per choice of a streamed request, the chunks' roles, and the usage chunks."""
    texts, finish, roles, usage = {}, {}, [], []
    for chunk in ask(client, stream=True, **kw):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage.append(chunk.usage)
        for choice in chunk.choices:
            if choice.delta.role is not None:
                roles.append((choice.index, choice.delta.role, len(texts.get(choice.index, ""))))
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                assert choice.index not in finish
                finish[choice.index] = choice.finish_reason
    return texts, finish, roles, usage


def test_an_answer_is_what_generate_gives_on_the_rendered_conversation(client, model):
    r = ask(client, temperature=1.0)
    ids, answer, finish = oracle(model, QUESTION, 30, 1.0, seeded(1))
    assert r.object == "chat.completion" and r.model == "chat"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == model.tokenizer.decode(answer)
    assert choice.finish_reason == finish
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(answer) + (finish == "stop")  # the end of the turn is generated too
    assert r.model_extra["turns_dropped"] == 0


def test_streamed_and_whole_answers_agree(client):
    whole = ask(client, n=2, max_completion_tokens=40)
    texts, finish, roles, usage = streamed(client, n=2, max_completion_tokens=40,
                                           stream_options={"include_usage": True})
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert roles == [(0, "assistant", 0), (1, "assistant", 0)]  # each choice's first chunk says the role
    assert len(usage) == 1 and usage[0].model_dump() == whole.usage.model_dump()


def test_n_choices_are_successive_draws_of_one_generator(client, model):
    r = ask(client, n=2, seed=5, temperature=1.0)
    generator = seeded(5)
    expected = [oracle(model, QUESTION, 30, 1.0, generator) for _ in range(2)]
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == [model.tokenizer.decode(a) for _, a, _ in expected]
    assert [c.finish_reason for c in r.choices] == [f for _, _, f in expected]


def test_same_seed_same_answer_other_seed_other_answer(client):
    first, again = ask(client, seed=11), ask(client, seed=11)
    assert first.choices[0].message.content == again.choices[0].message.content
    others = {ask(client, seed=s).choices[0].message.content for s in range(12, 16)}
    assert len(others | {first.choices[0].message.content}) > 1


def test_a_stop_string_cuts_the_answer_streamed_or_not(client, model):
    _, answer, _ = oracle(model, QUESTION, 30, 1.0, seeded(1))
    text = model.tokenizer.decode(answer)
    stop = next(ch for ch in text[1:] if ch.strip())  # a character the answer writes after its first
    r = ask(client, stop=[stop, "never written"])
    assert r.choices[0].message.content == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    texts, finish, _, _ = streamed(client, stop=stop)
    assert texts[0] == r.choices[0].message.content and finish[0] == "stop"


def test_logprobs_are_the_models_own(client, model):
    r = ask(client, temperature=0.0, logprobs=True, top_logprobs=3)
    ids = chat.render(model.tokenizer, QUESTION, add_generation_prompt=True).ids.tolist()
    content = r.choices[0].logprobs.content
    assert content and "".join(t.token for t in content) == r.choices[0].message.content
    with torch.no_grad():
        for t in content:
            logp = model.model(torch.tensor([ids]))[0, -1].double().log_softmax(-1)  # the oracle: a plain forward
            top = logp.topk(3)
            token_id = int(top.indices[0])  # greedy: the most likely token
            assert t.token == model.tokenizer.decode([token_id]) and bytes(t.bytes) == t.token.encode()
            assert t.logprob == pytest.approx(float(logp[token_id]), abs=1e-4)
            assert [x.token for x in t.top_logprobs] == [model.tokenizer.decode([int(i)]) for i in top.indices]
            assert [x.logprob for x in t.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
            ids.append(token_id)
    assert ask(client, temperature=0.0).choices[0].logprobs is None


def test_a_text_model_is_refused_with_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, model="text")
    assert e.value.status_code == 400 and e.value.body["code"] == "model_not_chat"
    assert "text model" in e.value.body["message"] and "/v1/completions" in e.value.body["message"]


def test_old_turns_are_dropped_to_fit_and_counted(client, model):
    turns = [{"role": r, "content": "a dog."} for r in ("user", "assistant") * 4]
    messages = [QUESTION[0], *turns, QUESTION[1]]
    r = ask(client, messages=messages, max_tokens=LIMITS.max_tokens, temperature=0.0)
    dropped = r.model_extra["turns_dropped"]
    assert 0 < dropped < 4
    kept = [QUESTION[0], *turns[2 * dropped:], QUESTION[1]]
    ids, answer, _ = oracle(model, kept, LIMITS.max_tokens, 0.0)
    assert r.usage.prompt_tokens == len(ids) <= 128 - min(LIMITS.max_tokens, 64)  # room left for the answer
    assert r.choices[0].message.content == model.tokenizer.decode(answer)
    with pytest.raises(openai.BadRequestError) as e:  # the latest turn alone is too long
        ask(client, messages=[{"role": "user", "content": "the cat " * 40}])
    assert e.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("kw, param", [
    (dict(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]), "messages"),
    (dict(messages=[{"role": "tool", "content": "hi"}]), "messages"),
    (dict(messages=[]), "messages"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(max_tokens=LIMITS.max_tokens + 1), "max_tokens"),
    (dict(max_completion_tokens=LIMITS.max_tokens + 1), "max_completion_tokens"),
    (dict(max_tokens=3, max_completion_tokens=4), "max_tokens"),
    (dict(presence_penalty=1.0), "presence_penalty"),
    (dict(temperature=3.0), "temperature"),
    (dict(n=17), "n"),
])
def test_bad_requests_are_400_naming_the_parameter(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_developer_messages_and_text_parts_are_read(client):
    plain = ask(client, seed=3)
    parts = ask(client, seed=3, messages=[{"role": "developer", "content": [{"type": "text", "text": "be brief."}]},
                                          {"role": "user", "content": [{"type": "text", "text": "the "},
                                                                       {"type": "text", "text": "cat"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_too_long_messages_are_413_and_unknown_models_404(served):
    url = served[0] + "/v1/chat/completions"
    status, body = http(url, {"model": "chat", "messages": [{"role": "user", "content": "a" * 401}]})
    assert status == 413 and body["error"]["code"] == "prompt_too_long"
    assert http(url, {"model": "nope", "messages": QUESTION})[0] == 404


def test_chat_shares_the_concurrency_cap_and_gives_slots_back(client, served):
    from test_serve import all_slots_taken, free_slots

    slots = served[1].state.generations
    with all_slots_taken(slots):
        with pytest.raises(openai.RateLimitError):
            ask(client)
    stream = ask(client, stream=True, max_tokens=LIMITS.max_tokens)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + HANG_S
    while free_slots(slots) < LIMITS.max_concurrent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert free_slots(slots) == LIMITS.max_concurrent


def test_an_answer_that_is_not_streamed_stops_when_its_client_hangs_up(served, model, monkeypatch):
    from test_serve import free_slots

    url, app = served
    produced, hung_up = [], threading.Event()
    stops = set(model.tokenizer.stop_ids)

    def slow_generate(*args, **kw):  # never ends its turn; 50 ms a token, 250 ms once the client has gone
        for token, logits in generate(*args, **kw):
            produced.append(token)
            yield (1 if token in stops else token), logits
            time.sleep(0.25 if hung_up.is_set() else 0.05)

    monkeypatch.setattr(lmlab.converse, "generate", slow_generate)
    payload = {"model": "chat", "messages": QUESTION, "max_tokens": LIMITS.max_tokens}
    conn = request_under_way(url, "/v1/chat/completions", payload, lambda: len(produced) >= 3)
    assert len(produced) >= 3 and free_slots(app.state.generations) == LIMITS.max_concurrent - 1
    conn.close()  # the client hangs up
    hung_up.set()
    deadline = time.monotonic() + HANG_S
    while free_slots(app.state.generations) < LIMITS.max_concurrent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert free_slots(app.state.generations) == LIMITS.max_concurrent
    stopped_at = len(produced)
    time.sleep(0.3)
    assert len(produced) == stopped_at < LIMITS.max_tokens // 2


def test_with_an_api_key_chat_needs_it(runs):
    with serving(runs, LIMITS, api_key=KEY) as (url, _):
        with pytest.raises(openai.AuthenticationError):
            ask(openai_client(url, "wrong"))
        assert ask(openai_client(url, KEY)).choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------------------------------------------------------
# lmlab chat and lmlab sample --chat


def chat_cli(run: Path, stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(lmlab_cmd("chat", str(run), *args), input=stdin, env=cli_env(), capture_output=True,
                          text=True, encoding="utf-8", timeout=HANG_S)


def prompt_sizes(stderr: str) -> list[int]:
    """The prompt sizes `lmlab chat` reports after each answer ("[N prompt + M answer tokens, ...]")."""
    return [int(line[1:].split()[0]) for line in stderr.splitlines() if line.startswith("[") and " prompt + " in line]


@pytest.mark.slow  # several seconds: trains, or starts processes
def test_lmlab_chat_answers_piped_turns_keeping_the_history(runs, model):
    system = {"role": "system", "content": "be brief."}
    proc = chat_cli(runs / "chat", "the cat\n\nsees a dog\n/reset\nhello\n", "--system", "be brief.", "--seed", "3",
                    "--max-new-tokens", "20")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    generator, history, expected, sizes = seeded(3), [], [], []
    for line in ("the cat", "sees a dog", None, "hello"):
        if line is None:  # /reset
            history = []
            continue
        messages = [*history, {"role": "user", "content": line}]
        ids, answer, _ = oracle(model, [system, *messages], 20, 0.8, generator)
        text = model.tokenizer.decode(answer)
        expected.append(text)
        sizes.append(len(ids))
        history = [*messages, {"role": "assistant", "content": text}]
    assert proc.stdout == "".join(text + "\n" for text in expected)
    # the second prompt holds the first turn (question and answer); after /reset, the third holds no history
    assert prompt_sizes(proc.stderr) == sizes
    alone = chat.render(model.tokenizer, [system, {"role": "user", "content": "sees a dog"}], add_generation_prompt=True)
    assert sizes[1] > len(alone.ids)
    assert "starts again" in proc.stderr


@pytest.mark.slow  # several seconds: trains, or starts processes
def test_lmlab_chat_leaves_out_the_oldest_turns_that_no_longer_fit_and_says_so(runs, model):
    question = "the cat sees the ball near the house."
    proc = chat_cli(runs / "chat", f"{question}\n" * 4, "--temperature", "0", "--max-new-tokens", "64")
    assert proc.returncode == 0, proc.stderr
    budget = 128 - 64  # the context less room for the answer
    history, expected, sizes = [], [], []
    for _ in range(4):
        messages = [*history, {"role": "user", "content": question}]
        while len(chat.render(model.tokenizer, messages, add_generation_prompt=True).ids) > budget:
            messages = messages[2:]  # the oldest turn: a question and its answer
        ids, answer, _ = oracle(model, messages, 64, 0.0)
        expected.append(model.tokenizer.decode(answer))
        sizes.append(len(ids))
        history = [*messages, {"role": "assistant", "content": expected[-1]}]
    assert proc.stdout == "".join(text + "\n" for text in expected) and prompt_sizes(proc.stderr) == sizes
    assert "no longer fit the 128-token context" in proc.stderr


@pytest.mark.slow  # several seconds: trains, or starts processes
def test_lmlab_chat_and_sample_chat_refuse_a_text_model(runs):
    proc = chat_cli(runs / "text", "hello\n")
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "text model (stage pretrain)" in proc.stderr
    proc = subprocess.run(lmlab_cmd("sample", str(runs / "text"), "--chat", "hello"), env=cli_env(),
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = chat_cli(runs / "chat", "hello\n", "--temperature", "-1")  # a bad setting: one line, before any answer
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.strip().splitlines() == [
        "lmlab chat: error: --temperature must be >= 0, got -1.0"]


def test_sample_chat_prints_the_greedy_answer(runs, model, capsys):
    assert main(["sample", str(runs / "chat"), "--chat", "the cat", "--temperature", "0",
                 "--max-new-tokens", "40"]) == 0
    _, answer, _ = oracle(model, [{"role": "user", "content": "the cat"}], 40, 0.0)
    assert capsys.readouterr().out == model.tokenizer.decode(answer) + "\n"
    assert main(["sample", str(runs / "chat"), "--chat", "x", "--prompt", "y"]) == 2


def read_until(fd: int, marker: str, seen: list[str]) -> str:
    """Read a pseudo-terminal until `marker` has appeared in what was read since the last call."""
    deadline, text = time.monotonic() + HANG_S, ""
    while marker not in text:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {marker!r} in {text!r}")
        if ready:
            try:
                text += os.read(fd, 4096).decode("utf-8", "replace")
            except OSError:  # the child closed the terminal
                break
    seen.append(text)
    return text.replace("\r\n", "\n")


@pytest.mark.slow
def test_lmlab_chat_in_a_terminal_answers_keeps_history_and_exits(fluent):
    run = load_run(fluent / "chat")
    parent, child = pty.openpty()
    proc = subprocess.Popen(lmlab_cmd("chat", str(fluent / "chat"), "--temperature", "0", "--max-new-tokens", "40"),
                            stdin=child, stdout=child, stderr=child, env=cli_env(), close_fds=True)
    os.close(child)
    seen: list[str] = []
    try:
        assert "/exit" in read_until(parent, "> ", seen)  # the banner says how to leave
        history = []
        for question in ("the cat", "a dog"):
            os.write(parent, question.encode() + b"\n")
            out = read_until(parent, "\n> ", seen)
            messages = [*history, {"role": "user", "content": question}]
            ids, answer, finish = oracle(run, messages, 40, 0.0)
            text = run.tokenizer.decode(answer)
            assert finish == "stop" and f"{question}\n{text}\n[{len(ids)} prompt + {len(answer) + 1} answer" in out
            history = [*messages, {"role": "assistant", "content": text}]
        os.write(parent, b"/exit\n")
        assert proc.wait(HANG_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(parent)
    assert "Traceback" not in "".join(seen)


@pytest.mark.slow
def test_lmlab_chat_in_a_terminal_ends_at_ctrl_d(fluent):
    parent, child = pty.openpty()
    proc = subprocess.Popen(lmlab_cmd("chat", str(fluent / "chat")), stdin=child, stdout=child, stderr=child,
                            env=cli_env(), close_fds=True)
    os.close(child)
    try:
        read_until(parent, "> ", [])
        os.write(parent, b"\x04")  # Ctrl-D: the end of the input
        assert proc.wait(HANG_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(parent)


# ---------------------------------------------------------------------------------------------------------------
# The export in transformers


def random_conversation(rng: random.Random, alphabet: str) -> list[dict]:
    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))

    messages = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(0, 3)):
        messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
    return [*messages, {"role": "user", "content": text()}]


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_every_tokenizer_kinds_export_renders_conversations_as_lmlab_does(kind, tmp_path):
    """From the files, as AutoTokenizer reads them: the chat template, and the template's special tokens (lmlab's
    BPE tokenizer encodes their strings as text; its export must split them out of the template's text)."""
    transformers = pytest.importorskip("transformers")
    from lmlab import hf
    from lmlab.model import ModelConfig, build_model

    text = "the cat sees a dog. a bird sees the cat!\n" * 20
    tokenizer = {"char": lambda: tok.CharTokenizer(sorted(set(text))), "byte": tok.ByteTokenizer,
                 "bpe": lambda: tok.BPETokenizer.train(iter([text]), 300)}[kind]()
    model = build_model(ModelConfig(block_size=64, n_layer=1, n_head=2, n_embd=16), tokenizer.vocab_size)
    hf.write_hf(model, tokenizer, tmp_path, chat=True)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    rng = random.Random(1)
    for _ in range(20):
        messages = random_conversation(rng, "the cat sees a dog.!\n")
        assert (theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
                == chat.render(tokenizer, messages, add_generation_prompt=True).ids.tolist())
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.special_tokens[tok.END], tokenizer.special_tokens[tok.ENDOFTEXT]]


@pytest.mark.slow
def test_the_export_renders_conversations_and_ends_turns_as_lmlab_does(fluent, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", str(fluent / "chat"), "--out", str(out), "--format", "hf"]) == 0
    run = load_run(fluent / "chat")
    ids = run.tokenizer.special_tokens
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids[tok.END], ids[tok.ENDOFTEXT]]
    assert generation["bos_token_id"] == generation["pad_token_id"] == ids[tok.ENDOFTEXT]
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == (tok.ENDOFTEXT, tok.END, tok.ENDOFTEXT)
    rng = random.Random(0)
    alphabet = "".join(run.tokenizer.chars)  # every character, "<" and "|" too: no special token spelled
    for _ in range(20):
        messages = random_conversation(rng, alphabet)
        assert (theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
                == chat.render(run.tokenizer, messages, add_generation_prompt=True).ids.tolist())
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    for question in ("the cat", "a small bird", "our neighbour"):
        proc = subprocess.run(lmlab_cmd("sample", str(fluent / "chat"), "--chat", question, "--temperature", "0",
                                        "--max-new-tokens", "60"), env=cli_env(), capture_output=True, text=True,
                              encoding="utf-8", timeout=HANG_S)
        assert proc.returncode == 0, proc.stderr
        prompt = theirs.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")
        generated = model.generate(**prompt, max_new_tokens=60, do_sample=False)[0, prompt["input_ids"].shape[1]:]
        assert int(generated[-1]) == ids[tok.END] and len(generated) < 60  # it stopped at the end of its turn
        assert theirs.decode(generated, skip_special_tokens=True) + "\n" == proc.stdout


def test_a_text_models_export_has_the_template_and_stops_at_the_end_of_text_only(runs, tmp_path):
    assert main(["export", str(runs / "text"), "--out", str(tmp_path / "hf"), "--format", "hf", "--no-verify"]) == 0
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    eot = load_run(runs / "text").tokenizer.special_tokens[tok.ENDOFTEXT]
    assert generation["eos_token_id"] == eot and config["eos_token"] == tok.ENDOFTEXT
    assert config["chat_template"] == tok.CHAT_TEMPLATE


# ---------------------------------------------------------------------------------------------------------------
# The playground's chat tab


@pytest.mark.browser
@pytest.mark.slow
def test_the_chat_tab_talks_to_a_chat_model_keeping_the_history(runs, model):
    from test_browser import chromium_path, open_page

    chromium = pytest.importorskip("playwright.sync_api")

    with chromium.sync_playwright() as playwright, serving(runs, LIMITS) as (url, _):
        try:
            browser = playwright.chromium.launch(executable_path=chromium_path())
        except Exception as e:  # noqa: BLE001 - a chromium that cannot start here
            pytest.skip(f"chromium does not start under Playwright: {str(e).splitlines()[0]}")
        page, errors = open_page(browser)
        page.goto(url + "/#chat")
        page.wait_for_selector('#chat-model option[value="chat"]', state="attached")
        assert page.get_attribute('#chat-model option[value="text"]', "disabled") is not None  # a text model
        assert page.input_value("#chat-model") == "chat"
        page.fill("#chat-temperature", "0")
        page.fill("#chat-max-tokens", "20")
        history = []
        for turn, question in enumerate(("the cat", "a dog"), 1):
            page.fill("#chat-input", question)
            page.press("#chat-input", "Enter")
            page.wait_for_function(f"document.querySelectorAll('#chat-log .assistant').length === {turn} && "
                                   f"!document.getElementById('chat-send').disabled")
            messages = [*history, {"role": "user", "content": question}]
            ids, answer, finish = oracle(model, messages, 20, 0.0)
            text = model.tokenizer.decode(answer)
            assert page.locator("#chat-log .assistant").nth(turn - 1).text_content() == text
            assert page.text_content("#chat-info").startswith(f"{len(ids)} prompt + {len(answer) + (finish == 'stop')}")
            history = [*messages, {"role": "assistant", "content": text}]
        page.click("#chat-reset")
        assert page.locator("#chat-log .message").count() == 0
        assert errors == []
        browser.close()

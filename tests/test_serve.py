"""`lmlab serve`: the OpenAI-compatible API driven by the official `openai` client against a real uvicorn server,
checked against trusted oracles (lmlab.sample.generate with the same seed, log_softmax of the model's own forward),
plus the dashboard's data endpoints, run status, limits and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from helpers import (HANG_S, ServerThread, cli_env, request_under_way, http, lmlab_cmd, openai_client, read_jsonl,
                     serving, tiny_config, write_corpus)
from lmlab.run import load_run
from lmlab.cli import main
from lmlab.sample import generate, text_banned

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[test]')")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install -e .)")

import lmlab.serve.completions  # noqa: E402
from lmlab.rundir import JsonlTail, run_status  # noqa: E402
from lmlab.serve.app import create_app, listen_socket  # noqa: E402
from lmlab.serve.completions import EventStream  # noqa: E402
from lmlab.serve.guard import allowed_host_names, origin_matches_host  # noqa: E402
from lmlab.serve.request import MAX_JSON_DEPTH, Limits, is_json_media_type, json_depth  # noqa: E402
from lmlab.serve.runs import RunSet  # noqa: E402

LIMITS = Limits(max_tokens=64, max_prompt_chars=200, max_concurrent=4)
PROMPT = "the cat "
KEY = "sk-lmlab-test-key"


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared with test_browser.py


def tiny_runs(tmp_path_factory) -> Path:
    """A folder with two tiny trained runs (alpha, with probes; beta, another seed), trained once per session."""
    root = tmp_path_factory.getbasetemp() / "serve-runs"
    done = root.with_name("serve-runs.done")
    if done.exists():
        return root
    from lmlab.train import train

    corpus = write_corpus(root.with_name("serve-corpus.txt"))
    quiet = dict(tensorboard=False, trajectory_snapshots=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(tmp_path_factory.mktemp("serve-cache")))
        train(tiny_config(corpus, root / "alpha", **quiet))
        train(tiny_config(corpus, root / "beta", seed=7, probe=False, **quiet))
    done.touch()
    return root


def free_slots(slots) -> int:
    """How many of the server's generation slots are free right now (taken, counted and given back at once)."""
    free = 0
    while slots.acquire(blocking=False):
        free += 1
    for _ in range(free):
        slots.release()
    return free


@contextlib.contextmanager
def all_slots_taken(slots):
    """Hold every generation slot, as running requests would."""
    taken = 0
    while slots.acquire(blocking=False):
        taken += 1
    try:
        yield taken
    finally:
        for _ in range(taken):
            slots.release()


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tiny_runs(tmp_path_factory)
    pending = root / "pending"  # a run that has started but has no checkpoint yet
    if not pending.exists():
        pending.mkdir()
        for name in ("config.json", "tokenizer.json"):
            shutil.copy(root / "alpha" / name, pending / name)
    return root


@pytest.fixture(scope="module")
def served(runs_root):
    with serving(runs_root, LIMITS) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served[0])


@pytest.fixture(scope="module")
def alpha(runs_root):
    return load_run(runs_root / "alpha")


def completion(client, **kw):
    if "top_k" in kw:  # lmlab's extension to OpenAI's schema travels in the body
        kw["extra_body"] = {**kw.get("extra_body", {}), "top_k": kw.pop("top_k")}
    return client.completions.create(**{"model": "alpha", "prompt": PROMPT, "max_tokens": 20, "seed": 1, **kw})


def streamed(client, **kw) -> tuple[dict[int, str], dict[int, str], dict[int, list], list]:
    """Texts, finish reasons and logprobs tokens per choice index of a streamed request, and the usage chunks."""
    texts, finish, tokens, usage = {}, {}, {}, []
    for chunk in completion(client, stream=True, **kw):
        if chunk.usage is not None:
            usage.append(chunk.usage)
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.logprobs is not None:
                tokens.setdefault(choice.index, []).extend(choice.logprobs.tokens)
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return texts, finish, tokens, usage


# ---------------------------------------------------------------------------------------------------------------
# The OpenAI-compatible API


def test_models_lists_the_runs_that_have_a_checkpoint(client):
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "beta"]
    assert client.models.retrieve("beta").id == "beta"


def test_completion_is_what_generate_gives_with_the_same_seed(client, alpha):
    out = completion(client, temperature=0.9, top_k=10, top_p=0.95, seed=42, max_tokens=30)
    ids = alpha.tokenizer.encode(PROMPT)
    expected = list(generate(alpha.model, ids, 30, 0.9, 10, 0.95, torch.Generator().manual_seed(42),
                             banned=text_banned(alpha.tokenizer)))
    choice = out.choices[0]
    assert choice.text == alpha.tokenizer.decode(expected)
    assert choice.finish_reason == "length"
    assert out.model == "alpha" and out.object == "text_completion"
    usage = out.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(ids), 30, len(ids) + 30)


def test_same_seed_same_text_other_seed_other_text(client):
    first, again, other = (completion(client, seed=s, max_tokens=40).choices[0].text for s in (3, 3, 4))
    assert first == again
    assert first != other
    two = completion(client, seed=3, max_tokens=40, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == first and two.choices[1].text != first  # n choices draw from one seeded stream


def test_greedy_is_the_argmax_continuation(client, alpha):
    ids = alpha.tokenizer.encode(PROMPT)
    n_new = alpha.model.cfg.block_size - len(ids)  # one window: no cut, the loop below sees every token
    out = completion(client, temperature=0, max_tokens=n_new, seed=None)
    with torch.no_grad():
        for _ in range(n_new):  # by hand: append the most likely next token under the model's full forward
            ids.append(int(alpha.model(torch.tensor([ids]))[0, -1].argmax()))
    assert n_new >= 8 and len(set(ids[-n_new:])) > 1  # not one token repeated: the comparison means something
    assert out.choices[0].text == alpha.tokenizer.decode(ids[-n_new:])


def test_stream_gives_the_same_text_as_a_plain_request(client):
    plain = completion(client, seed=11, max_tokens=40)
    texts, finish, _, usage = streamed(client, seed=11, max_tokens=40, stream_options={"include_usage": True})
    assert texts == {0: plain.choices[0].text} and finish == {0: "length"}
    assert usage and usage[-1].completion_tokens == 40 and usage[-1].prompt_tokens == plain.usage.prompt_tokens


def test_stop_string_cuts_the_text_the_same_way_streamed_or_not(client):
    full = completion(client, seed=12, max_tokens=40).choices[0].text
    stop = full[15:17]  # a stop string that this seed is known to generate
    expected = full[: full.find(stop)]
    plain = completion(client, seed=12, max_tokens=40, stop=[stop, "never-generated"], logprobs=1)
    texts, finish, tokens, _ = streamed(client, seed=12, max_tokens=40, stop=[stop, "never-generated"], logprobs=1)
    assert plain.choices[0].text == expected and plain.choices[0].finish_reason == "stop"
    assert texts == {0: expected} and finish == {0: "stop"}
    assert tokens[0] == plain.choices[0].logprobs.tokens
    # every token generated is listed, the ones that made up the stop string too
    assert "".join(tokens[0]).startswith(expected + stop)


def test_logprobs_are_the_models_log_softmax(client, alpha):
    prompt_ids = alpha.tokenizer.encode(PROMPT)
    n_new = alpha.model.cfg.block_size - len(prompt_ids)  # one window: the model's forward sees it all at once
    out = completion(client, seed=5, temperature=0.8, max_tokens=n_new, logprobs=3)
    lp = out.choices[0].logprobs
    text = out.choices[0].text
    ids = prompt_ids + alpha.tokenizer.encode(text)
    with torch.no_grad():
        logits = alpha.model(torch.tensor([ids]))
    oracle = logits[0].float().log_softmax(-1)[len(prompt_ids) - 1: -1]  # (n_new, V): each new token's distribution
    assert "".join(lp.tokens) == text and len(lp.tokens) == n_new
    assert lp.text_offset == [len(PROMPT) + i for i in range(n_new)]  # char tokenizer: one character per token
    for i, token_id in enumerate(ids[len(prompt_ids):]):
        assert lp.token_logprobs[i] == pytest.approx(float(oracle[i, token_id]), abs=1e-4)
        values, top_ids = oracle[i].topk(3)
        expected_top = {alpha.tokenizer.decode([int(t)]): float(v) for v, t in zip(values, top_ids)}
        assert lp.top_logprobs[i].keys() == expected_top.keys()
        for token, value in expected_top.items():
            assert lp.top_logprobs[i][token] == pytest.approx(value, abs=1e-4)


def test_concurrent_requests_give_what_each_gives_alone(client):
    seeds = [21, 22, 23, 24]
    alone = {s: completion(client, seed=s, max_tokens=48).choices[0].text for s in seeds}
    barrier = threading.Barrier(len(seeds))

    def together(seed):
        barrier.wait()
        if seed % 2:
            return "".join(streamed(client, seed=seed, max_tokens=48)[0].values())
        return completion(client, seed=seed, max_tokens=48).choices[0].text

    with ThreadPoolExecutor(len(seeds)) as pool:
        results = dict(zip(seeds, pool.map(together, seeds)))
    assert results == alone
    assert len(set(alone.values())) == len(seeds)


# ---------------------------------------------------------------------------------------------------------------
# Refusals: OpenAI-style errors with a 4xx status


@pytest.mark.parametrize("kw, param", [
    ({"temperature": 2.5}, "temperature"), ({"temperature": -0.1}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"), ({"n": 0}, "n"), ({"logprobs": 21}, "logprobs"),
    ({"max_tokens": LIMITS.max_tokens + 1}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"echo": "yes"}, "echo"), ({"prompt": 5}, "prompt"),
    ({"prompt": "\u2603 is not in a char vocabulary built from English text"}, "prompt"),
    ({"extra_body": {"frequency_penalty": 0.5}}, "frequency_penalty"), ({"extra_body": {"foo": 1}}, "foo"),
])
def test_out_of_range_parameters_are_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        completion(client, **kw)
    error = e.value.body
    assert e.value.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]


def test_unknown_model_is_404_and_paths_are_never_opened(client, runs_root):
    for model in ("nope", str(runs_root / "alpha"), "../serve-runs/alpha", "alpha/../beta"):
        with pytest.raises(openai.NotFoundError) as e:
            completion(client, model=model)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_a_run_without_checkpoint_is_listed_on_the_dashboard_but_cannot_complete(client, served):
    with pytest.raises(openai.ConflictError) as e:
        completion(client, model="pending")
    assert "no checkpoint" in e.value.body["message"]
    status, body = http(served[0] + "/api/runs")
    runs = {r["name"]: r for r in body["runs"]}
    assert sorted(runs) == ["alpha", "beta", "pending"]
    assert runs["pending"]["checkpoint_step"] is None and runs["alpha"]["checkpoint_step"] == 20


def test_too_long_prompt_is_413(client):
    with pytest.raises(openai.APIStatusError) as e:
        completion(client, prompt="the cat " * 26)  # 208 characters, over the limit of 200
    assert e.value.status_code == 413 and e.value.body["param"] == "prompt"


def test_bad_json_and_wrong_content_type_are_refused(served):
    url = served[0] + "/v1/completions"
    status, body = http(url, data=b'{"model": "alpha", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = http(url, data=b'["model", "alpha"]')
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = http(url, data=b'{"model": "alpha"}', headers={"Content-Type": "text/plain"})
    assert status == 415
    status, body = http(url, data=b"x" * (12 * LIMITS.max_prompt_chars + 65537))
    assert status == 413


def test_over_the_concurrency_cap_is_429(client, served):
    with all_slots_taken(served[1].state.generations) as taken:
        assert taken == LIMITS.max_concurrent
        with pytest.raises(openai.RateLimitError) as e:
            completion(client)
        assert e.value.status_code == 429 and "--max-concurrent" in e.value.body["message"]
    assert completion(client).choices[0].text  # the slots are free again


@pytest.mark.parametrize("path, payload", [("/api/next", {"model": "alpha", "prompt": PROMPT, "sample": True}),
                                           ("/api/surprisal", {"model": "alpha", "text": PROMPT})])
def test_the_playground_endpoints_share_the_concurrency_cap(served, path, payload):
    url, app = served
    with all_slots_taken(app.state.generations):
        status, body = http(url + path, payload)
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert http(url + path, payload)[0] == 200
    assert free_slots(app.state.generations) == LIMITS.max_concurrent  # the request gave its slot back


def test_streams_give_their_slot_back_when_the_client_goes_away(client, served):
    slots = served[1].state.generations
    stream = completion(client, stream=True, max_tokens=LIMITS.max_tokens)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + HANG_S
    while free_slots(slots) < LIMITS.max_concurrent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert free_slots(slots) == LIMITS.max_concurrent


def test_a_completion_that_is_not_streamed_stops_when_its_client_hangs_up(served, monkeypatch):
    url, app = served
    produced, hung_up = [], threading.Event()

    def slow_generate(*args, **kw):  # 50 ms a token, 250 ms once the client has gone: the rest would take 15 s
        for token in generate(*args, **kw):
            produced.append(token)
            yield token
            time.sleep(0.25 if hung_up.is_set() else 0.05)

    monkeypatch.setattr(lmlab.serve.completions, "generate", slow_generate)
    payload = {"model": "alpha", "prompt": PROMPT, "max_tokens": LIMITS.max_tokens}
    conn = request_under_way(url, "/v1/completions", payload, lambda: len(produced) >= 3)
    assert len(produced) >= 3 and free_slots(app.state.generations) == LIMITS.max_concurrent - 1
    conn.close()  # the client hangs up
    hung_up.set()
    deadline = time.monotonic() + HANG_S
    while free_slots(app.state.generations) < LIMITS.max_concurrent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert free_slots(app.state.generations) == LIMITS.max_concurrent, "the slot was held after the client had gone"
    stopped_at = len(produced)
    time.sleep(0.3)
    assert len(produced) == stopped_at < LIMITS.max_tokens // 2  # generation stopped, long before max_tokens


def test_an_event_stream_gives_its_slot_back_when_the_client_is_gone_before_the_first_event():
    closed, started = [], []

    async def events():
        started.append(True)
        yield "data: {}\n\n"

    async def send(message):
        raise OSError("the client went away")

    async def receive():
        return {"type": "http.disconnect"}

    response = EventStream(events(), lambda: closed.append(True))
    with contextlib.suppress(Exception):
        asyncio.run(response({"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST"}, receive, send))
    assert closed == [True] and started == []


def test_content_type_must_be_exactly_json(served):
    url = served[0] + "/api/surprisal"
    data = json.dumps({"model": "alpha", "text": PROMPT}).encode()
    # text/plain is a type any page may POST to any site without asking it first (no CORS preflight)
    for refused in ("text/plain;charset=application/json", "text/plain; application/json", "application/jsonx",
                    "application/json-seq", "application/json; charset=latin-1", ""):
        assert http(url, data=data, headers={"Content-Type": refused})[0] == 415, refused
    for accepted in ("application/json", " Application/JSON ", "application/json; charset=utf-8",
                     'application/json;charset="UTF-8"'):
        assert http(url, data=data, headers={"Content-Type": accepted})[0] == 200, accepted
    assert not is_json_media_type("text/plain;charset=application/json")


def test_cross_site_requests_are_403(served):
    url = served[0]
    port = url.rsplit(":", 1)[1]
    ask = {"model": "alpha", "text": PROMPT}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": f"http://localhost:{port}"},
                    {"Origin": f"http://127.0.0.1:{int(port) + 1}"}, {"Origin": f"https://127.0.0.1:{port}"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Sec-Fetch-Site": "same-origin", "Origin": "http://evil.example"}):
        for path, payload in (("/api/surprisal", ask), ("/api/runs", None), ("/v1/models", None)):
            status, body = http(url + path, payload, headers=headers)
            assert status == 403 and body["error"]["code"] == "cross_site_request", (path, headers)
    for headers in ({"Origin": url}, {"Sec-Fetch-Site": "same-origin", "Origin": url}, {"Sec-Fetch-Site": "none"}, {}):
        assert http(url + "/api/surprisal", ask, headers=headers)[0] == 200, headers
    # the page itself may be opened from a link on any site
    page = urllib.request.Request(url + "/", headers={"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"})
    assert urllib.request.urlopen(page, timeout=HANG_S).status == 200


def test_origin_matching_uses_default_ports():
    assert origin_matches_host("http://example.org", "example.org:80")
    assert origin_matches_host("https://example.org", "example.org", "https")
    assert not origin_matches_host("https://example.org", "example.org", "http")
    assert origin_matches_host("http://[::1]:8000", "[::1]:8000")
    assert not origin_matches_host("http://example.org", "example.org:8000")
    assert not origin_matches_host("http://example.org:x", "example.org")
    assert not origin_matches_host("http://user@example.org", "example.org")
    assert not origin_matches_host("http://example.org", None)


def test_deeply_nested_json_is_400_not_500(runs_root):
    app = create_app(RunSet([runs_root]), Limits())  # the default body limit, which a 100,000-deep body is under
    with ServerThread(app) as url:
        for depth in (100_000, MAX_JSON_DEPTH + 1):
            for path in ("/v1/completions", "/api/next"):
                status, body = http(url + path, data=b"[" * depth + b"]" * depth)
                assert status == 400 and "deep" in body["error"]["message"], (depth, path)
        status, body = http(url + "/v1/completions", data=b"[" * 100_000)  # unclosed, too
        assert status == 400
        nested = {"model": "alpha", "prompt": PROMPT, "max_tokens": 2, "user": "[{" * 50}  # brackets in a string
        assert http(url + "/v1/completions", nested)[0] == 200
    assert json_depth(rb'{"a": [1, {"b": "]]\"[[["}], "c": "\\"}') == 3


@pytest.fixture(scope="module")
def keyed(runs_root):
    app = create_app(RunSet([runs_root]), LIMITS, api_key=KEY)
    with ServerThread(app) as url:
        yield url


@pytest.mark.parametrize("path, payload", [("/v1/models", None), ("/api/runs", None), ("/api/log?run=alpha", None),
                                           ("/api/surprisal", {"model": "alpha", "text": PROMPT}),
                                           ("/v1/completions", {"model": "alpha", "prompt": PROMPT})])
def test_with_an_api_key_every_api_request_needs_it(keyed, path, payload):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}):
        status, body = http(keyed + path, payload, headers=headers)
        assert status == 401, headers
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "invalid_api_key" and "Bearer" in body["error"]["message"]
    assert http(keyed + path, payload, headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    assert http(keyed + path, payload, headers={"Authorization": f"bearer  {KEY} "})[0] == 200


def test_with_an_api_key_the_page_needs_none(keyed):
    for path in ("/", "/static/app.js", "/static/uPlot.iife.min.js"):
        assert urllib.request.urlopen(keyed + path, timeout=HANG_S).status == 200


def test_the_openai_client_sends_the_api_key(keyed):
    client = openai.OpenAI(base_url=keyed + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "beta"]
    assert completion(client, max_tokens=5).choices[0].text
    stranger = openai.OpenAI(base_url=keyed + "/v1", api_key="not-the-key", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        stranger.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"


def test_allowed_host_names():
    assert allowed_host_names("127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_host_names("::1", ["lab.example"]) == ["[::1]", "127.0.0.1", "localhost", "lab.example"]
    assert allowed_host_names("127.0.0.2") == ["127.0.0.2", "127.0.0.1", "localhost", "[::1]"]
    assert allowed_host_names("192.168.1.5", ["Lab.Example"]) == ["192.168.1.5", "lab.example"]
    assert allowed_host_names("fe80::1") == ["[fe80::1]"]


def test_a_loopback_server_refuses_foreign_host_names(runs_root):
    app = create_app(RunSet([runs_root]), LIMITS, allowed_hosts=["127.0.0.1", "localhost"])
    with ServerThread(app) as url:
        assert http(url + "/v1/models")[0] == 200
        request = urllib.request.Request(url + "/v1/models", headers={"Host": "attacker.example"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=HANG_S)
        assert e.value.code == 400


# ---------------------------------------------------------------------------------------------------------------
# The playground's endpoints


def test_next_token_view_matches_inspect_and_sampling(served, alpha):
    from lmlab.predict import next_token_distribution

    payload = {"model": "alpha", "prompt": PROMPT, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "top": 8,
               "sample": True, "seed": 9}
    status, view = http(served[0] + "/api/next", payload)
    assert status == 200
    rows = next_token_distribution(alpha.model, alpha.tokenizer, PROMPT, 8, 0.7, 5, 0.9, text_banned(alpha.tokenizer))
    assert [r["token"] for r in view["rows"]] == [r.token for r in rows]
    assert [r["renormalized"] for r in view["rows"]] == pytest.approx([r.renormalized for r in rows], abs=1e-6)
    ids = alpha.tokenizer.encode(PROMPT)
    drawn = next(generate(alpha.model, ids, 1, 0.7, 5, 0.9, torch.Generator().manual_seed(9),
                         banned=text_banned(alpha.tokenizer)))
    sampled = view["sampled"]
    assert sampled["token_id"] == drawn and sampled["text"] == alpha.tokenizer.decode([drawn])
    row = next(r for r in rows if r.token_id == drawn)  # top-k 5 keeps only rows among the top 8
    assert sampled["probability"] == pytest.approx(row.renormalized, abs=1e-6)
    assert sampled["model_probability"] == pytest.approx(row.probability, abs=1e-6)
    assert http(served[0] + "/api/next", {**payload, "temperature": 9})[0] == 400


def test_surprisal_view_matches_inspect(served, alpha):
    from lmlab.predict import surprisal

    status, view = http(served[0] + "/api/surprisal", {"model": "alpha", "text": "the dog sees a book."})
    tokens, metrics, first = surprisal(alpha.model, alpha.tokenizer, "the dog sees a book.")
    assert status == 200 and view["first"] == first and view["tokens"] == metrics.tokens
    assert [t["bits"] for t in view["per_token"]] == pytest.approx([t.bits for t in tokens], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The dashboard's data: live logs, run status, runs appearing


def test_log_endpoint_sends_only_new_records(served, runs_root):
    url = served[0] + "/api/log?run=alpha"
    status, first = http(url)
    assert status == 200 and first["start"] == 0
    assert first["records"] == read_jsonl(runs_root / "alpha" / "metrics.jsonl")
    _, again = http(f"{url}&since={len(first['records'])}&epoch={first['epoch']}")
    assert again == {"epoch": first["epoch"], "start": len(first["records"]), "records": []}
    _, stale = http(f"{url}&since=3&epoch={first['epoch'] + 1}")  # an epoch the client cannot have: all again
    assert stale["start"] == 0 and len(stale["records"]) == len(first["records"])
    _, probes = http(served[0] + "/api/log?run=alpha&file=probes")
    assert probes["records"] == read_jsonl(runs_root / "alpha" / "probes.jsonl") and probes["records"]
    assert http(served[0] + "/api/log?run=alpha&file=config")[0] == 400
    assert http(served[0] + "/api/log?run=../alpha")[0] == 404


def test_the_dashboard_reads_an_rl_runs_completions_by_step(tmp_path, runs_root):
    """completions.jsonl (--stage rl) through /api/log?file=completions: the well-formed records, in order; a record
    whose reward is not a number is left out, as training never writes one."""
    run = tmp_path / "rl"
    shutil.copytree(runs_root / "alpha", run)
    good = [{"step": s, "held_out": [{"prompt": "1 plus 2 is ", "completion": f"{s}.", "reward": float(s == 3)}],
             "train": [{"prompt": "2 plus 2 is ", "completion": "4.", "reward": 1.0}]} for s in (0, 3)]
    bad = {"step": 5, "held_out": [{"prompt": "x", "completion": "y", "reward": "high"}]}
    (run / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [good[0], bad, good[1]]))
    with ServerThread(create_app(RunSet([run]), LIMITS)) as url:
        status, body = http(url + "/api/log?run=rl&file=completions")
    assert status == 200 and body["records"] == good


def test_jsonl_tail_reads_complete_lines_and_restarts_on_a_rewrite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = JsonlTail(path.parent, path.name)
    epoch, records = tail.read()
    assert records == []
    path.write_text('{"step": 1}\n{"step": 2')  # the second line is still being written
    epoch1, records = tail.read()
    assert records == [{"step": 1}]
    with open(path, "a") as f:
        f.write(', "train_loss": 2.5}\nnot json\n{"step": 3}\n')
    assert tail.read() == (epoch1, [{"step": 1}, {"step": 2, "train_loss": 2.5}, {"step": 3}])
    replacement = tmp_path / "new.jsonl"
    replacement.write_text('{"step": 1}\n')
    os.replace(replacement, path)  # what a resumed run does when it cuts its log back to the checkpoint
    epoch2, records = tail.read()
    assert epoch2 != epoch1 and records == [{"step": 1}]


@pytest.mark.slow
def test_dashboard_follows_a_training_while_it_runs(tmp_path, served):
    """A real training in a thread: the log endpoint of a server that was already running sees its new records
    while the run's status reads running, and the finished run's whole log at the end."""
    from lmlab.train import train

    folder = tmp_path / "runs"
    folder.mkdir()
    app = create_app(RunSet([folder]), LIMITS)
    cfg = tiny_config(write_corpus(tmp_path / "corpus.txt"), folder / "live", max_steps=0, max_time=3.0,
                      eval_interval=10_000, probe=False, tensorboard=False, trajectory_snapshots=0)
    with ServerThread(app) as url:
        assert http(url + "/api/runs")[1]["runs"] == []
        worker = threading.Thread(target=train, args=(cfg,))
        worker.start()
        seen, epoch, counts = [], 0, []
        try:
            while worker.is_alive():
                runs = http(url + "/api/runs")[1]["runs"]
                if runs and runs[0]["status"] == "running":
                    _, body = http(f"{url}/api/log?run=live&since={len(seen)}&epoch={epoch}")
                    seen = body["records"] if body["start"] == 0 else seen + body["records"]
                    epoch = body["epoch"]
                    counts.append(len(seen))
                time.sleep(0.25)
        finally:
            worker.join()
        _, body = http(f"{url}/api/log?run=live&since={len(seen)}&epoch={epoch}")
        seen = seen + body["records"] if body["start"] else body["records"]
        assert len(set(c for c in counts if c)) >= 2, f"no growth seen while the run was running: {counts}"
        assert seen == read_jsonl(folder / "live" / "metrics.jsonl")
        assert http(url + "/api/runs")[1]["runs"][0]["status"] == "finished"


def test_run_status_reads_the_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert run_status(run)["status"] == "unknown"
    (run / "status.json").write_text(json.dumps({"status": "running", "pid": 1, "time": 0}))
    assert run_status(run)["status"] == "failed"  # says running, but nobody holds the lock: it died
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a live training holds
        assert run_status(run)["status"] == "running"
    finally:
        os.close(fd)
    assert run_status(run)["status"] == "failed"
    (run / "status.json").write_text(json.dumps({"status": "finished", "pid": 1, "time": 0}))
    assert run_status(run)["status"] == "finished"


def test_a_runs_folder_picks_up_new_runs(tmp_path, runs_root):
    folder = tmp_path / "runs"
    folder.mkdir()
    runs = RunSet([folder])
    assert runs.current() == {}
    shutil.copytree(runs_root / "beta", folder / "beta")
    (folder / "notes").mkdir()
    assert list(runs.current()) == ["beta"]
    both = RunSet([runs_root / "alpha", folder / "beta"])
    assert list(both.current()) == ["alpha", "beta"]


def test_a_newer_checkpoint_is_loaded_on_the_next_request(tmp_path, runs_root):
    from lmlab.run import Run
    from lmlab.train import train

    run = tmp_path / "gamma"
    shutil.copytree(runs_root / "alpha", run)
    app = create_app(RunSet([run]), LIMITS)
    with ServerThread(app) as url:
        ask = {"model": "gamma", "prompt": PROMPT, "max_tokens": 20, "seed": 3}
        before = http(url + "/v1/completions", ask)[1]
        cfg = dataclasses.replace(Run.open(run).config, resume=str(run), max_steps=30,
                                  probe=False)
        train(cfg)
        after = http(url + "/v1/completions", ask)[1]
    assert (before["system_fingerprint"], after["system_fingerprint"]) == ("step_00000020", "step_00000030")
    fresh = load_run(run)
    ids = fresh.tokenizer.encode(PROMPT)
    tokens = generate(fresh.model, ids, 20, 1.0, 0, 1.0, torch.Generator().manual_seed(3),
                      banned=text_banned(fresh.tokenizer))
    expected = fresh.tokenizer.decode(list(tokens))
    assert after["choices"][0]["text"] == expected != before["choices"][0]["text"]


# ---------------------------------------------------------------------------------------------------------------
# The command


def test_cli_errors_are_one_line_and_exit_2(tmp_path, runs_root, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmlab serve: error: no such run")
    busy = listen_socket("127.0.0.1", 0)
    try:
        assert main(["serve", str(runs_root / "alpha"), "--port", str(busy.getsockname()[1])]) == 2
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in use" in err and err.startswith("lmlab serve: error:")
    assert main(["serve", str(runs_root / "alpha"), "--max-tokens", "0"]) == 2
    assert capsys.readouterr().err.startswith("lmlab serve: error:")


def test_cli_refuses_to_listen_beyond_this_machine_without_an_api_key(runs_root, capsys, monkeypatch):
    monkeypatch.delenv("LMLAB_API_KEY", raising=False)
    for host in ("0.0.0.0", "192.0.2.1", "::"):
        assert main(["serve", str(runs_root / "alpha"), "--host", host, "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lmlab serve: error: --host") and "--api-key" in err, err
    monkeypatch.setenv("LMLAB_API_KEY", KEY)  # a key, but nothing tells which host names clients will use
    assert main(["serve", str(runs_root / "alpha"), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allowed-host" in err
    assert main(["serve", str(runs_root / "alpha"), "--api-key", " spaced "]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
def test_a_server_beyond_this_machine_checks_host_names_and_the_key(tmp_path, runs_root):
    env = {**cli_env(), "LMLAB_API_KEY": KEY}  # the key from the environment, as --api-key is not given
    proc = subprocess.Popen(lmlab_cmd("serve", str(runs_root), "--host", "0.0.0.0", "--port", "0",
                                      "--allowed-host", "lab.example", "--allowed-host", "lab2.example"),
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "http://0.0.0.0:" in line, line
        port = line.split("http://0.0.0.0:")[1].split("/")[0]
        url, key = f"http://127.0.0.1:{port}/v1/models", {"Authorization": f"Bearer {KEY}"}
        for host in ("lab.example", "lab2.example", "0.0.0.0"):
            assert http(url, headers={"Host": f"{host}:{port}", **key})[0] == 200, host
        for host in ("attacker.example", "127.0.0.1", "localhost"):
            assert http(url, headers={"Host": f"{host}:{port}", **key})[0] == 400, host
        assert http(url, headers={"Host": f"lab.example:{port}"})[0] == 401
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=HANG_S) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_lmlab_serve_command_serves_and_stops_on_ctrl_c(tmp_path, runs_root):
    env = cli_env()
    env.pop("LMLAB_API_KEY", None)  # a key in the caller's environment would be asked for
    proc = subprocess.Popen(lmlab_cmd("serve", str(runs_root), "--port", "0"), cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "http://127.0.0.1:" in line, line
        url = line.split(" at ")[1].split()[0].rstrip("/")
        status, body = http(url + "/v1/models")
        assert status == 200 and sorted(m["id"] for m in body["data"]) == ["alpha", "beta"]
        page = urllib.request.urlopen(url + "/", timeout=HANG_S).read().decode()
        assert "uPlot.iife.min.js" in page and "app.js" in page
        assert urllib.request.urlopen(url + "/static/uPlot.iife.min.js", timeout=HANG_S).status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=HANG_S) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

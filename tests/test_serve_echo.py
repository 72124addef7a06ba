"""`lmlab serve`'s completions as harnesses use them (lm-eval's local-completions, the openai client): the prompt echoed
with its log-probabilities, token-id prompts, batches, and prompts longer than the context, checked against the
model's own forward (log_softmax) and evaluate's windowed scoring."""
# ruff: noqa: F811 - the tests take test_serve's fixtures, imported below, as arguments

from __future__ import annotations

import json

import pytest
import torch

from helpers import http
from lmlab.evaluate import stream_losses
from lmlab.predict import surprisal

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[test]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install -e .)")

# the server of test_serve.py (its limits, its runs alpha and beta), shared: the fixtures are imported
from test_serve import LIMITS, alpha, client, runs_root, served  # noqa: E402,F401

PROMPT = "the cat sees"  # 12 characters: inside the tiny runs' context of 16 tokens
LONG = "the cat sees the ball near the house.\na dog likes a red apple every morning.\n"  # 77 tokens: 5 windows of 16


def scored(client, prompt, **kw):
    """An echoed completion's choices, as lm-eval asks for a log-likelihood (max_tokens 0: no generation)."""
    return client.completions.create(**{"model": "alpha", "prompt": prompt, "echo": True, "logprobs": 3,
                                        "max_tokens": 0, "temperature": 0, **kw})


def oracle_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, V): the distribution of each token after the first, from one forward of the whole prompt."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)


def test_echo_gives_the_prompts_log_softmax_with_the_first_token_null(client, alpha):
    ids = alpha.tokenizer.encode(PROMPT)
    out = scored(client, PROMPT)
    choice, lp = out.choices[0], out.choices[0].logprobs
    assert choice.text == PROMPT and "".join(lp.tokens) == PROMPT
    assert lp.text_offset == list(range(len(PROMPT)))  # char tokenizer: one character per token
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    oracle = oracle_logprobs(alpha.model, ids)
    for i, token_id in enumerate(ids[1:], start=1):
        assert lp.token_logprobs[i] == pytest.approx(float(oracle[i - 1, token_id]), abs=1e-5)
        values, top_ids = oracle[i - 1].topk(3)
        expected = {alpha.tokenizer.decode([int(t)]): float(v) for v, t in zip(values, top_ids)}
        assert lp.top_logprobs[i].keys() == expected.keys()
        assert list(lp.top_logprobs[i].values()) == pytest.approx(list(expected.values()), abs=1e-5)
        # a token that is the most likely has exactly the top value (lm-eval's is_greedy compares with ==)
        greedy = int(oracle[i - 1].argmax()) == token_id
        assert (lp.token_logprobs[i] == max(lp.top_logprobs[i].values())) == greedy
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
    assert choice.finish_reason == "length"


def test_echo_with_one_token_generated_as_lm_eval_asks(client, alpha):
    """lm-eval sends max_tokens 1 with echo and drops the last entry: the prompt's entries come first, unchanged."""
    ids = alpha.tokenizer.encode(PROMPT)
    alone = scored(client, PROMPT).choices[0]
    out = scored(client, PROMPT, max_tokens=1, logprobs=1, seed=1234)
    choice, lp = out.choices[0], out.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and choice.text == PROMPT + lp.tokens[-1]
    assert lp.token_logprobs[:-1] == alone.logprobs.token_logprobs
    assert lp.text_offset[-1] == len(PROMPT)
    with torch.no_grad():  # greedy: the token generated is the argmax after the whole prompt
        assert lp.tokens[-1] == alpha.tokenizer.decode([int(alpha.model(torch.tensor([ids]))[0, -1].argmax())])
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())
    assert out.usage.completion_tokens == 1


def test_echo_without_logprobs_is_the_prompt_then_the_completion(client):
    plain = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=10, seed=3)
    echoed = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=10, seed=3, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text and echoed.choices[0].logprobs is None
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens == 10
    two = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=10, seed=3, echo=True, n=2)
    assert [c.text.startswith(PROMPT) for c in two.choices] == [True, True]


def test_echo_streamed_starts_with_the_prompt(client):
    plain = scored(client, PROMPT, max_tokens=5, seed=4, temperature=1)
    chunks = list(scored(client, PROMPT, max_tokens=5, seed=4, temperature=1, stream=True,
                         stream_options={"include_usage": True}))
    assert chunks[0].choices[0].text == PROMPT
    text = "".join(c.text for chunk in chunks for c in chunk.choices)
    logprobs = [x for chunk in chunks for c in chunk.choices if c.logprobs for x in c.logprobs.token_logprobs]
    assert text == plain.choices[0].text and logprobs == plain.choices[0].logprobs.token_logprobs
    assert chunks[-1].usage.completion_tokens == 5


def test_token_id_prompts_equal_text_prompts(client, alpha):
    ids = alpha.tokenizer.encode(PROMPT)
    by_text, by_ids = scored(client, PROMPT).choices[0], scored(client, ids).choices[0]
    assert by_ids.text == by_text.text
    assert by_ids.logprobs.model_dump() == by_text.logprobs.model_dump()
    generated = [client.completions.create(model="alpha", prompt=p, max_tokens=8, seed=9).choices[0].text
                 for p in (PROMPT, ids)]
    assert generated[0] == generated[1]


def test_batches_of_token_ids_and_of_texts(client, alpha):
    prompts = [PROMPT, "a dog likes", "the ball"]
    ids = [alpha.tokenizer.encode(p) for p in prompts]
    eot = alpha.tokenizer.special_tokens["<|endoftext|>"]
    alone = [scored(client, p).choices[0] for p in prompts]
    for batch in (ids, prompts):
        out = scored(client, batch)
        assert [c.index for c in out.choices] == [0, 1, 2]
        assert [c.logprobs.token_logprobs for c in out.choices] == [c.logprobs.token_logprobs for c in alone]
        assert [c.text for c in out.choices] == prompts
    # lm-eval's rolling windows start with its prefix token, the end of text: a special token is a valid id
    out = scored(client, [[eot] + ids[0]]).choices[0]
    assert out.logprobs.tokens[0] == "<|endoftext|>" and len(out.logprobs.token_logprobs) == len(ids[0]) + 1


def test_a_special_tokens_string_in_a_text_prompt_is_that_token(client, alpha):
    """As the export's tokenizer in transformers reads it: lm-eval's text requests (tokenized_requests=False) are its
    token windows decoded, the first one starting with the end of text."""
    eot = alpha.tokenizer.special_tokens["<|endoftext|>"]
    ids = alpha.tokenizer.encode(PROMPT)
    by_ids = scored(client, [[eot, *ids, eot, *ids[:4]]]).choices[0].logprobs
    by_text = scored(client, f"<|endoftext|>{PROMPT}<|endoftext|>{PROMPT[:4]}").choices[0].logprobs
    assert by_text.model_dump() == by_ids.model_dump() and by_text.tokens.count("<|endoftext|>") == 2


def test_the_openai_clients_echo_is_lmlab_surprisal(client, alpha):
    """completions.create(echo=True, logprobs=1, max_tokens=0): the prompt's log-probabilities are minus `lmlab
    surprisal`'s nats on the same text, token by token."""
    out = client.completions.create(model="alpha", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    per_token, _, _ = surprisal(alpha.model, alpha.tokenizer, PROMPT)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.tokens[1:] == [t.text for t in per_token]
    assert lp.token_logprobs[1:] == pytest.approx([-t.nats for t in per_token], abs=1e-5)


@pytest.mark.parametrize("prompt, words", [
    ([[1, 2, 10_000]], "token id 10000"), ([[-1, 2]], "token id -1"), ([[]], "prompt must be"),
    ([[1, 2], "text"], "prompt must be"), ([1, True], "prompt must be"), ([], "prompt must be"),
])
def test_bad_token_id_prompts_are_400_in_one_line(client, prompt, words):
    with pytest.raises(openai.BadRequestError) as e:
        scored(client, prompt)
    message = e.value.body["message"]
    assert words in message and "\n" not in message and e.value.body["param"] == "prompt"


def test_token_ids_count_toward_the_prompt_limit(client):
    with pytest.raises(openai.APIStatusError) as e:
        scored(client, [[1] * (LIMITS.max_prompt_chars + 1)])
    assert e.value.status_code == 413


def test_a_prompt_longer_than_the_context_is_scored_in_windows_as_evaluate_does(client, alpha):
    block = alpha.model.cfg.block_size
    ids = alpha.tokenizer.encode(LONG)
    assert len(ids) > 4 * block
    lp = scored(client, LONG).choices[0].logprobs
    assert lp.token_logprobs[0] is None and "".join(lp.tokens) == LONG
    windowed = stream_losses(alpha.model, ids, block, stride=block)  # `lmlab eval --stride BLOCK`
    assert lp.token_logprobs[1:] == pytest.approx((-windowed.nats).tolist(), abs=1e-5)
    per_token, _, _ = surprisal(alpha.model, alpha.tokenizer, LONG)  # `lmlab surprisal` on the same text
    assert lp.token_logprobs[1:] == pytest.approx([-t.nats for t in per_token], abs=1e-5)
    # the first window is the model's forward on the first block tokens; a later window starts afresh
    oracle = oracle_logprobs(alpha.model, ids[:block])
    assert lp.token_logprobs[1:block] == pytest.approx([float(oracle[i, ids[i + 1]]) for i in range(block - 1)],
                                                       abs=1e-5)
    again = oracle_logprobs(alpha.model, ids[block:2 * block])
    assert lp.token_logprobs[block + 1] == pytest.approx(float(again[0, ids[block + 1]]), abs=1e-5)
    # generating after it: the continuation of its last block tokens
    out = scored(client, LONG, max_tokens=4, logprobs=None).choices[0].text
    assert out.startswith(LONG) and len(out) == len(LONG) + 4


def test_the_openai_client_with_lm_evals_arguments_over_raw_http(served, alpha):
    """The request exactly as lm-eval's local-completions sends it (a list of token-id lists, max_tokens 1), and
    its reading of the answer: sum of token_logprobs[ctxlen:-1], greedy when each equals its top value."""
    ids = alpha.tokenizer.encode(PROMPT)
    ctxlen = 4
    payload = {"model": "alpha", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    status, body = http(served[0] + "/v1/completions", payload)
    assert status == 200, body
    lp = body["choices"][0]["logprobs"]
    oracle = oracle_logprobs(alpha.model, ids)
    expected = sum(float(oracle[i - 1, ids[i]]) for i in range(ctxlen, len(ids)))
    assert sum(lp["token_logprobs"][ctxlen:-1]) == pytest.approx(expected, abs=1e-4)
    greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]))
    assert greedy == all(int(oracle[i - 1].argmax()) == ids[i] for i in range(ctxlen, len(ids)))
    assert json.dumps(body)  # plain JSON: no NaN or infinity


@pytest.mark.slow
def test_lm_eval_reads_the_answer(served, alpha):
    """lm-eval's own parser of local-completions answers, where lm-eval is installed."""
    completions = pytest.importorskip("lm_eval.models.openai_completions", reason="lm-eval is not installed")
    ids = alpha.tokenizer.encode(PROMPT)
    payload = {"model": "alpha", "prompt": [ids, ids[:6]], "temperature": 0, "max_tokens": 1, "logprobs": 1,
               "seed": 1234, "echo": True}
    status, body = http(served[0] + "/v1/completions", payload)
    assert status == 200, body
    parsed = completions.LocalCompletionsAPI.parse_logprobs(body, tokens=[ids, ids[:6]], ctxlens=[3, 3])
    for (logprob, _), prompt in zip(parsed, (ids, ids[:6])):
        oracle = oracle_logprobs(alpha.model, prompt)
        assert logprob == pytest.approx(sum(float(oracle[i - 1, prompt[i]]) for i in range(3, len(prompt))),
                                        abs=1e-4)

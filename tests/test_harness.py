"""`lmlab eval RUN --tasks`: EleutherAI's lm-evaluation-harness on a run, through harness.LmlabLM. Tasks are YAML
files over local JSONL files (no network): a multiple-choice task checked against the accuracy computed here from the
model's log-probabilities, a rolling perplexity task checked against `lmlab eval --stride BLOCK`, and a generation
task checked against sample.generate's greedy text. Skipped where lm-eval is not installed, except the one-line
refusal that a missing lm-eval gets."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import HANG_S, cli_env, make_text, tiny_config

BLOCK = 16
MC = [("the cat", [" sees the ball.", " sees a dog", " sees some"], 0),
      ("a dog likes", [" the river.", " the rivers", " a letter"], 0),
      ("my friend paints", [" a book!", " a boo!", " the garden."], 1),
      ("her brother", [" finds the blue door.", " finds the door", " rains"], 2)]
PROMPTS = ["the cat sees", "A dog", "my friend paints the"]


def lmlab(*args: str) -> tuple[int, str, str]:
    """`lmlab ARGS` in this process (torch and lm-eval are imported once): exit code, stdout, stderr."""
    from lmlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def task_yaml(folder: Path, name: str, rows: list[dict], body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                         f"    test: {json.dumps(str(data))}\ntest_split: test\n{body}",
                                         encoding="utf-8")


@pytest.fixture(scope="module")
def lm_eval(tmp_path_factory):
    """lm-eval, offline: its datasets library reads these when it is first imported, here."""
    cache = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(cache)),
                            ("HF_DATASETS_CACHE", str(cache / "datasets"))):
            mp.setenv(name, value)
        yield pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny char-level run (block 16) trained for 150 steps on English-ish lines, loaded."""
    from lmlab.run import load_run
    from lmlab.train import train

    root = tmp_path_factory.mktemp("harness")
    corpus = root / "corpus.txt"
    corpus.write_text(make_text(400), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(root / "cache"))
        summary = train(tiny_config(corpus, root / "runs", max_steps=150, eval_interval=150,
                                    model_n_embd=32, batch_size=8))
    return SimpleNamespace(root=root, run=load_run(summary["run_dir"]), path=Path(summary["run_dir"]))


def greedy(run, prompt: str, n: int = 20, until: str = "\n") -> str:
    from lmlab.sample import generate, text_banned

    tokens = generate(run.model, run.tokenizer.encode(prompt), n, temperature=0.0, banned=text_banned(run.tokenizer))
    text = run.tokenizer.decode(list(tokens))
    return text.split(until)[0]


def continuation_logprob(run, context: str, continuation: str) -> float:
    """The oracle: one sequence (its rightmost block_size + 1 tokens), one forward, no batching, no padding."""
    ids = run.tokenizer.encode(context + continuation)[-(BLOCK + 1):]
    n = min(len(run.tokenizer.encode(continuation)), len(ids) - 1)
    with torch.no_grad():
        logp = run.model(torch.tensor([ids[:-1]])).log_softmax(-1)[0]  # (T, V)
    return float(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1 - n, len(ids) - 1)))


@pytest.fixture(scope="module")
def results(trained, lm_eval):
    """One `lmlab eval --tasks` of the three local tasks, as JSON; and the text of the rolling task."""
    tasks = trained.root / "tasks"
    tasks.mkdir()
    quiet = "    aggregation: mean\n    higher_is_better: true\n"
    task_yaml(tasks, "lmlab_mc", [{"q": q, "choices": c, "label": label} for q, c, label in MC],
              "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: label\n"
              f"target_delimiter: ''\nmetric_list:\n  - metric: acc\n{quiet}")
    text = make_text(1500, seed=3)  # about 45,000 characters, so that the first token weighs little
    (trained.root / "roll.txt").write_text(text, encoding="utf-8")
    task_yaml(tasks, "lmlab_roll", [{"text": text}],
              "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\nmetric_list:\n"
              "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n"
              "  - metric: byte_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n")
    answers = [greedy(trained.run, p) for p in PROMPTS]
    task_yaml(tasks, "lmlab_gen", [{"q": p, "a": a} for p, a in zip(PROMPTS, answers)],
              "output_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\ngeneration_kwargs:\n"
              "  until: ['\\n']\n  max_gen_toks: 20\nmetric_list:\n  - metric: exact_match\n"
              f"{quiet}")
    code, out, err = lmlab("eval", str(trained.path), "--tasks", "lmlab_mc,lmlab_roll,lmlab_gen", "--include-path",
                           str(tasks), "--json", "--device", "cpu")
    assert code == 0, err[-3000:]
    return json.loads(out)["results"], text


def test_multiple_choice_accuracy_is_the_models_own_choice(trained, results):
    got = results[0]["lmlab_mc"]
    chosen = [int(np.argmax([continuation_logprob(trained.run, q, c) for c in choices])) for q, choices, _ in MC]
    oracle = np.mean([pick == label for pick, (_, _, label) in zip(chosen, MC)])
    assert got["acc"] == pytest.approx(oracle, abs=1e-9)
    assert "acc_stderr" in got


def test_rolling_bits_per_byte_agree_with_lmlab_eval_stride_block(trained, results):
    got = results[0]["lmlab_roll"]["bits_per_byte"]
    code, out, err = lmlab("eval", str(trained.path), "--data", str(trained.root / "roll.txt"), "--stride", str(BLOCK),
                           "--json", "--device", "cpu")
    assert code == 0, err
    ours = json.loads(out)
    assert abs(got - ours["bits_per_byte"]) < 1e-3
    # exactly: eval's tokens, plus the first one, scored after the end-of-text token
    run, text = trained.run, results[1]
    prefix = run.tokenizer.special_tokens["<|endoftext|>"]
    with torch.no_grad():
        first = float(run.model(torch.tensor([[prefix]]))[0, -1].log_softmax(-1)[run.tokenizer.encode(text[0])[0]])
    nats = ours["loss"] * ours["tokens"] - first
    assert got == pytest.approx(nats / math.log(2) / len(text.encode("utf-8")), rel=1e-6)


def test_generation_is_samples_greedy_text_cut_at_the_stop_string(trained, results):
    assert results[0]["lmlab_gen"]["exact_match"] == 1.0
    from lmlab.harness import LmlabLM

    lm = LmlabLM(trained.run)
    for prompt in PROMPTS:
        request = SimpleNamespace(args=(prompt, {"until": ["e"], "max_gen_toks": 12}))
        assert lm.generate_until([request]) == [greedy(trained.run, prompt, 12, "e")]
    # many requests at once, in batches of 2, with different stops and budgets: each the answer it gets alone
    asks = [(p, until, n) for p in PROMPTS for until, n in ((["e"], 12), (["\n"], 5), (["zz"], 20))]
    lm = LmlabLM(trained.run, batch_size=2)
    got = lm.generate_until([SimpleNamespace(args=(p, {"until": u, "max_gen_toks": n})) for p, u, n in asks])
    assert got == [greedy(trained.run, p, n, u[0]) for p, u, n in asks]


def test_loglikelihood_batches_like_one_sequence_at_a_time(trained, lm_eval):
    from lmlab.harness import LmlabLM

    run = trained.run
    long = make_text(3).rstrip()  # longer than the context: its rightmost tokens are kept
    pairs = [("the cat", " sees the ball."), ("a", " dog"), (long, " the river."), ("my friend ", "paints")]
    requests = [SimpleNamespace(args=pair) for pair in pairs]
    one = LmlabLM(run, batch_size=1).loglikelihood(requests)
    batched = LmlabLM(run, batch_size=3).loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(one, batched):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    assert one[0][0] == pytest.approx(continuation_logprob(run, *pairs[0]), abs=1e-4)
    assert one[3][0] == pytest.approx(continuation_logprob(run, "my friend", " paints"), abs=1e-4)  # the space moves
    ids = run.tokenizer.encode(long + " the river.")[-(BLOCK + 1):]
    with torch.no_grad():
        logp = run.model(torch.tensor([ids[:-1]])).log_softmax(-1)[0]
    n = len(" the river.")
    assert one[2][0] == pytest.approx(float(sum(logp[t, ids[t + 1]] for t in range(BLOCK - n, BLOCK))), abs=1e-4)
    # an empty context is the end-of-text token
    empty = LmlabLM(run).loglikelihood([SimpleNamespace(args=("", "the"))])[0][0]
    prefix = run.tokenizer.special_tokens["<|endoftext|>"]
    with torch.no_grad():
        logp = run.model(torch.tensor([[prefix, *run.tokenizer.encode("th")]])).log_softmax(-1)[0]
    assert empty == pytest.approx(float(sum(logp[i, t] for i, t in enumerate(run.tokenizer.encode("the")))), abs=1e-4)


def test_the_chat_template_renders_and_its_special_tokens_are_ids(trained, lm_eval):
    from lmlab import chat
    from lmlab.harness import LmlabLM

    run = trained.run
    lm = LmlabLM(run, chat_template=True)
    messages = [{"role": "user", "content": "the cat"}]
    text = lm.apply_chat_template(messages)
    assert text == chat.render_text(run.tokenizer, messages, add_generation_prompt=True)
    assert lm.chat_template(True) == run.tokenizer.chat_template and lm.tokenizer_name.startswith("lmlab-char")
    assert run.tokenizer.special_tokens["<|user|>"] in lm.encode(text)


def test_options_that_do_not_combine_are_one_line(trained, lm_eval, tmp_path):
    for args in (["--tasks", "x", "--stride", "4"], ["--limit", "3"], ["--tasks", "nope", "--include-path",
                                                                          str(tmp_path / "missing")]):
        code, out, err = lmlab("eval", str(trained.path), *args, "--device", "cpu")
        assert code == 2 and not out and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_an_unknown_task_is_one_line(lm_eval, tmp_path):
    """Slow: a name not in --include-path is looked for among lm-eval's own tasks, whose index takes seconds."""
    from lmlab.common import LmlabError
    from lmlab.harness import task_manager

    (tmp_path / "t.yaml").write_text("task: mine\ndataset_path: json\noutput_type: loglikelihood\n")
    with pytest.raises(LmlabError, match="unknown task 'nope'"):
        task_manager(["mine", "nope"], str(tmp_path))


@pytest.mark.slow  # a subprocess of its own
def test_without_lm_eval_the_tasks_say_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['lm_eval'] = None; from lmlab.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.run([sys.executable, "-c", code, "eval", str(run), "--tasks", "hellaswag"],
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and 'pip install "lmlab[eval]"' in proc.stderr, proc.stderr

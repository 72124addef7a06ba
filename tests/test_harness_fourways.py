"""One number, four ways: the bits per byte of a trained run's validation text from `lmlab eval --stride BLOCK`, from
`lmlab eval --tasks` with a local rolling task, from lm-eval's hf backend on the unmodified export, and from lm-eval's
local-completions against `lmlab serve` (tokenized requests with the export's tokenizer, and text); and a local
multiple-choice task's accuracy through `lmlab eval --tasks` and through the hf backend. Slow: a run is trained and
lm-eval runs five times. Offline: the tasks are YAML files over local JSONL files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import serving, tiny_config
from test_harness import lm_eval, lmlab, task_yaml  # noqa: F401 - lm_eval is a fixture

pytestmark = pytest.mark.slow
BLOCK = 16
ROLL = ("output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\nmetric_list:\n"
        "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")
CHOICE = ("output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: label\n"
          "target_delimiter: ''\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def choices_from(text: str, n: int = 12) -> list[dict]:
    """Multiple-choice documents cut from the text: a context, then its true continuation among two altered ones
    (each choice within the context of 16 tokens); the label is the true one's place."""
    docs = []
    for k in range(n):
        i = 997 * k + 13
        context, true = text[i:i + 10], text[i + 10:i + 14]
        wrong = [true[::-1], true[1:] + true[0]]
        options = [true, *wrong][k % 3:] + [true, *wrong][:k % 3]
        docs.append({"q": context, "choices": options, "label": options.index(true)})
    return docs


@pytest.fixture(scope="module")
def four(tmp_path_factory, lm_eval):  # noqa: F811
    """A char-level run (block 16) trained for 600 steps on a first-order Markov text (synthetic.markov_text), whose
    validation split is 60,000 bytes; its validation text, its export, and the local tasks: that text as a rolling
    task, and a multiple-choice task cut from it.

    Why a Markov text: lm-eval's windows start one token before lmlab's (its first token is scored after a prefix
    token), so the tokens that see one, two, three tokens of context are other tokens; on English text with a
    context of 16 that alone moves the bits per byte by up to 1e-2. A model of a source whose next symbol depends
    only on the current one predicts alike from any context, so the four ways differ by less than 1e-3."""
    from lmlab.evaluate import text_tokens
    from lmlab.run import load_run
    from lmlab.synthetic import markov_text
    from lmlab.train import train

    root = tmp_path_factory.mktemp("fourways")
    corpus = root / "corpus.txt"
    corpus.write_text(markov_text(7, 600_000), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(root / "cache"))
        summary = train(tiny_config(corpus, root / "runs", max_steps=600, eval_interval=600, model_n_embd=32,
                                    batch_size=8, tensorboard=False, trajectory_snapshots=0))
        path = Path(summary["run_dir"])
        run = load_run(path)
        text = run.tokenizer.decode(text_tokens(run, None, False, "test").tolist())
    assert len(text.encode("utf-8")) >= 50_000
    tasks = root / "tasks"
    tasks.mkdir()
    task_yaml(tasks, "four_roll", [{"text": text}], ROLL)
    task_yaml(tasks, "four_mc", choices_from(text), CHOICE)
    export = root / "export"
    code, _, err = lmlab("export", str(path), "--format", "hf", "--out", str(export))
    assert code == 0, err[-2000:]
    return SimpleNamespace(path=path, run=run, text=text, tasks=tasks, export=export, manager=None)


def harness(four, model: str, model_args: str, tasks: list[str], batch_size: int = 16) -> dict:
    """lm-eval's own simple_evaluate with one of its backends, on the local tasks: {task: {metric: value}}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if four.manager is None:  # indexing lm-eval's own tasks takes seconds: once
        four.manager = TaskManager(include_path=str(four.tasks))
    out = simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=batch_size, log_samples=False,
                          task_manager=four.manager, verbosity="WARNING")
    return {task: {key.split(",")[0]: value for key, value in row.items() if key.endswith(",none")}
            for task, row in out["results"].items()}


@pytest.fixture(scope="module")
def ours(four):
    """`lmlab eval --stride BLOCK --json` on the validation split, and `lmlab eval --tasks` on the local tasks."""
    code, out, err = lmlab("eval", str(four.path), "--stride", str(BLOCK), "--json", "--device", "cpu",
                           "--trust-data-path")
    assert code == 0, err[-2000:]
    code, tasks_out, err = lmlab("eval", str(four.path), "--tasks", "four_roll,four_mc", "--include-path",
                                 str(four.tasks), "--json", "--device", "cpu")
    assert code == 0, err[-2000:]
    return json.loads(out), json.loads(tasks_out)["results"]


@pytest.fixture(scope="module")
def hf_backend(four):
    return harness(four, "hf", f"pretrained={four.export},device=cpu", ["four_roll", "four_mc"])


def through_serve(four, tokenized: bool) -> float:
    """lm-eval's local-completions against `lmlab serve` on the run's folder: the rolling task's bits per byte (one
    window of lm-eval's 2,047 tokens per request, as lm-eval sends by default)."""
    from lmlab.serve.request import Limits

    with serving(four.path.parent, Limits()) as (url, _):
        args = (f"model={four.path.name},base_url={url}/v1/completions,tokenizer={four.export},"
                f"tokenizer_backend=huggingface,tokenized_requests={tokenized},max_retries=1")
        return harness(four, "local-completions", args, ["four_roll"], 1)["four_roll"]["bits_per_byte"]


def test_bits_per_byte_four_ways_agree(four, ours, hf_backend):
    stride, tasks = ours
    first = tasks["four_roll"]["bits_per_byte"]
    ways = {"lmlab eval --stride BLOCK": stride["bits_per_byte"], "lmlab eval --tasks": first,
            "lm-eval hf on the export": hf_backend["four_roll"]["bits_per_byte"]}
    for tokenized in (True, False):
        ways[f"lm-eval local-completions (tokenized_requests={tokenized})"] = through_serve(four, tokenized)
    print(f"\nbits/byte of {len(four.text.encode()):,} bytes:\n" +
          "\n".join(f"  {name:<55} {value:.6f}" for name, value in ways.items()))
    for name, value in ways.items():
        assert abs(value - stride["bits_per_byte"]) < 1e-3, (name, ways)
    assert 0 < stride["bits_per_byte"] < 8 and math.isfinite(stride["bits_per_byte"])


def test_multiple_choice_accuracy_is_the_same_through_lmlab_and_the_hf_backend(ours, hf_backend):
    ours_mc, theirs = ours[1]["four_mc"], hf_backend["four_mc"]
    assert ours_mc["acc"] == theirs["acc"] and ours_mc["acc_stderr"] == pytest.approx(theirs["acc_stderr"])

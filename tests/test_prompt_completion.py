"""--stage sft on TRL's prompt-completion format (plain text, no chat template): the mask covers exactly the
completion and the end of text, a malformed line is one error, and a run trains only the completion's tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import stage_config, tiny_config, write_corpus

from lmlab import sft
from lmlab import tokenizer as tok
from lmlab.common import LmlabError


def test_the_mask_covers_exactly_the_completion_and_the_end_of_text():
    tokenizer = tok.CharTokenizer("0123456789 .plusi\n")
    pair = sft.Completion("\n12 plus 3 is ", "15.", "line 1")
    rendered = sft.encode_completion(tokenizer, pair)
    prompt, completion = tokenizer.encode("\n12 plus 3 is "), tokenizer.encode("15.")
    end = tokenizer.special_tokens[tok.ENDOFTEXT]
    assert rendered.ids.tolist() == prompt + completion + [end]
    assert rendered.mask.tolist() == [False] * len(prompt) + [True] * (len(completion) + 1)
    # a tokenizer without an end of text: the completion alone
    bare = tok.CharTokenizer("0123456789 .plusi\n", special_tokens=())
    rendered = sft.encode_completion(bare, pair)
    assert rendered.ids.tolist() == bare.encode("\n12 plus 3 is 15.")
    assert rendered.mask.tolist() == [False] * len(prompt) + [True] * len(completion)
    with pytest.raises(LmlabError, match="line 1"):
        sft.encode_completion(tokenizer, sft.Completion("x", "y", "line 1"))  # not in the char vocabulary


def test_a_file_is_recognised_by_its_first_line_and_a_bad_line_is_one_error(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text("\n" + "".join(json.dumps({"prompt": f"{i} plus 1 is ", "completion": f"{i + 1}."}) + "\n"
                                   for i in range(10)))
    assert sft.is_completion_file(str(good))
    splits = sft.read_chat_data(str(good), None, 0.2, seed=0)
    assert len(splits.train) == 8 and len(splits.val) == 2 and sft.are_completions(splits)
    assert {p.prompt for p in splits.train + splits.val} == {f"{i} plus 1 is " for i in range(10)}
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert not sft.is_completion_file(str(chats))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps({"prompt": "a", "completion": "b"}), json.dumps({"prompt": "a"}),
                              "not json", json.dumps({"prompt": "a", "completion": ""})]) + "\n")
    with pytest.raises(LmlabError) as e:
        sft.read_chat_data(str(bad), None, 0.1, seed=0)
    message = str(e.value)
    assert "line 2" in message and "and 2 more malformed lines" in message and "\n" not in message


def test_a_run_fine_tunes_on_the_completions_only(tmp_path, monkeypatch):
    from lmlab.run import load_run
    from lmlab.train import train

    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=100, extra="0123456789 plus is.\n")
    train(tiny_config(corpus, tmp_path / "base", model_block_size=32, max_steps=4, eval_interval=4))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"\n{i} plus {i} is ", "completion": f"{2 * i}."}) + "\n"
                            for i in range(20)))
    run = Path(train(stage_config("sft", tmp_path / "base", str(data), tmp_path / "sft", max_steps=4))["run_dir"])
    config = json.loads((run / "config.json").read_text())
    assert config["stage"] == "sft" and config.get("chat") is False  # a text model: no conversations
    assert (run / "tokenizer.json").read_text() == (tmp_path / "base" / "tokenizer.json").read_text()  # none added
    # step 0's validation loss: the base's mean cross-entropy of the held-out completions (and end of text) alone
    base = load_run(tmp_path / "base")
    splits = sft.read_chat_data(str(data), None, 0.1, 1337)
    nats, count = 0.0, 0
    for pair in splits.val:
        r = sft.encode_completion(base.tokenizer, pair)
        with torch.no_grad():
            logp = base.model(torch.from_numpy(r.ids[None, :-1])).log_softmax(-1)[0]
        targets = torch.from_numpy(r.ids[1:])
        trained = torch.from_numpy(r.mask[1:])
        nats -= float(logp[torch.arange(len(targets)), targets][trained].sum())
        count += int(trained.sum())
    first = next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                 if "val_loss" in json.loads(line))
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(nats / count, rel=1e-4)
    assert count == sum(int(np.sum(sft.encode_completion(base.tokenizer, p).mask)) for p in splits.val)
    # `lmlab eval` of the run without --data: its own held-out pairs, the completions' masked loss (as validation had)
    from lmlab.run import Run

    assert sft.evaluates_conversations(Run.open(run).config, None)
    best = min((json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                if "val_loss" in json.loads(line)), key=lambda r: r["val_loss"])
    evaluated = sft.evaluate_run(load_run(run), None)
    assert evaluated["loss"] == pytest.approx(best["val_loss"], rel=1e-4)
    assert evaluated["conversations"] == len(splits.val) and evaluated["answers"] == 0

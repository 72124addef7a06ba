"""The export is complete for harnesses (lm-eval's hf backend): a tokenizer with lmlab's end of text names it as bos
and eos in tokenizer_config.json and generation_config.json, so transformers' tokenizer has them and `generate`
stops at the end of a text; an older run's export says what lm-eval needs instead."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_config, write_corpus
from lmlab import hf
from lmlab import tokenizer as tok
from lmlab.run import load_run
from lmlab.cli import main
from lmlab.sample import generate
from lmlab.tokenizer import ByteTokenizer, CharTokenizer
from test_hf import CHARS, bpe_tokenizer, lmlab_model

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOKENIZERS = {"char": lambda: CharTokenizer(CHARS), "byte": ByteTokenizer, "bpe": bpe_tokenizer}


def written(folder, name: str) -> dict:
    return json.loads((folder / name).read_text())


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_the_end_of_text_is_bos_and_eos_of_the_tokenizer_and_of_generation(tmp_path, kind):
    tokenizer = TOKENIZERS[kind]()
    eot, end = tokenizer.special_tokens[tok.ENDOFTEXT], tokenizer.special_tokens[tok.END]
    for chat in (False, True):
        folder = tmp_path / str(chat)
        hf.write_hf(lmlab_model(vocab=tokenizer.vocab_size), tokenizer, folder, chat=chat)
        theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
        generation = written(folder, "generation_config.json")
        assert theirs.bos_token_id == theirs.pad_token_id == generation["bos_token_id"] == eot
        if chat:  # a chat model ends its turn; the end of a text ends it too
            assert theirs.eos_token_id == end and generation["eos_token_id"] == [end, eot]
        else:
            assert theirs.eos_token_id == generation["eos_token_id"] == eot
        assert transformers.GenerationConfig.from_pretrained(str(folder)).eos_token_id == generation["eos_token_id"]
        text = "the cat sat"
        assert theirs(text)["input_ids"] == tokenizer.encode(text)  # still nothing added to a text


def test_transformers_generation_stops_at_the_end_of_text(tmp_path):
    """A prompt after which lmlab's greedy generation (which does not stop there) writes the end of text after a
    few tokens: transformers writes the same tokens up to it, and stops."""
    tokenizer = CharTokenizer(CHARS)
    eot = tokenizer.special_tokens[tok.ENDOFTEXT]
    model = lmlab_model(seed=8, vocab=tokenizer.vocab_size)  # one that writes it
    hf.write_hf(model, tokenizer, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    for first in range(len(CHARS)):  # the first one-character prompt whose continuation has it, not first
        ours = list(generate(model, [first], 12, temperature=0.0))
        if eot in ours[1:-1]:
            break
    else:
        pytest.fail("no prompt leads this model to the end of text")
    out = theirs.generate(torch.tensor([[first]]), max_new_tokens=12, do_sample=False,
                          attention_mask=torch.ones(1, 1, dtype=torch.long))[0, 1:].tolist()
    assert out == ours[:ours.index(eot) + 1] and len(out) < 12


def test_a_tokenizer_without_special_tokens_names_none_and_the_export_says_what_lm_eval_needs(tmp_path):
    tokenizer = CharTokenizer(CHARS, special_tokens=())  # as runs older than the special tokens have it
    hf.write_hf(lmlab_model(vocab=tokenizer.vocab_size), tokenizer, tmp_path)
    config, generation = written(tmp_path, "tokenizer_config.json"), written(tmp_path, "generation_config.json")
    assert config["bos_token"] is config["eos_token"] is generation["eos_token_id"] is generation["bos_token_id"] is None
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path)).bos_token_id is None
    note = hf.lm_eval_note(tokenizer, tmp_path)
    assert f"pretrained={tmp_path},prefix_token_id={tokenizer.encode(chr(10))[0]}" in note and "\n" not in note
    assert hf.lm_eval_note(CharTokenizer(CHARS), tmp_path) is None


def test_lmlab_export_of_a_trained_run_names_its_end_of_text_and_still_verifies(tmp_path, monkeypatch, capsys):
    from lmlab.train import train

    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    train(tiny_config(write_corpus(tmp_path / "corpus.txt"), tmp_path / "run", max_steps=2, tensorboard=False,
                      trajectory_snapshots=0))
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert "verified with transformers" in capsys.readouterr().err
    eot = load_run(tmp_path / "run").tokenizer.special_tokens[tok.ENDOFTEXT]
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert theirs.bos_token_id == theirs.eos_token_id == eot
    generation = written(tmp_path / "hf", "generation_config.json")
    assert generation["bos_token_id"] == generation["eos_token_id"] == eot

"""Supervised fine-tuning (lmlab train --stage sft, lmlab/sft.py): packed conversations against each conversation
alone, the masked loss against a hand computation and against changed targets, the sampler's determinism and its
global-batch layout, validation against a per-conversation oracle, runs from an lmlab run (with and without the
special tokens) and from a transformers model, exact resume, and what the command line refuses."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import HANG_S, cli_env, crash_test, read_jsonl, stage_config, tiny_config, write_corpus

from lmlab import chat, sft, synthetic
from lmlab import tokenizer as tok
from lmlab.common import LmlabError
from lmlab.budget import apply_budget
from lmlab.config import SFT_DEFAULTS, TrainConfig, get_preset
from lmlab.distributed import Dist
from lmlab.loss import LossConfig, cross_entropy, masked_loss
from lmlab.model import ModelConfig, Packing, build_model
from lmlab.optim import OptimConfig, build_optimizer

REPO = Path(__file__).resolve().parents[1]
SYSTEM_USER_ASSISTANT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Copy: abc"},
                         {"role": "assistant", "content": "abc"}]


def chats_file(path: Path, count: int = 120, seed: int = 0, split: str = "train") -> Path:
    """A JSONL file of synthetic:chat conversations (no skills: a file has no verifier)."""
    path.write_text("".join(json.dumps({"messages": t.messages}) + "\n"
                            for t in synthetic.chat_tasks(seed, split, count)))
    return path


def sft_config(base: Path, data: str, out: Path, **overrides) -> TrainConfig:
    """A small SFT run of the base: the SFT defaults, a few steps, no extras."""
    return stage_config("sft", base, data, out, **overrides)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A base run (byte tokenizer, context 96) trained for a few steps, from which the SFT runs start."""
    from lmlab.train import train

    root = tmp_path_factory.mktemp("sft-base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(root / "cache"))
        corpus = write_corpus(root / "corpus.txt", n_lines=200)
        train(tiny_config(corpus, root / "base", data_tokenizer="byte", model_block_size=96, model_n_embd=32,
                          max_steps=10, eval_interval=10, checkpoint_interval=10))
    return root / "base"


# ---------------------------------------------------------------------------------------------------------------
# The model: packed sequences against each sequence alone


def model_of(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=16, zero_init_proj=False, **options)
    return build_model(cfg, 23).eval()


@pytest.mark.parametrize("options", [dict(pos="rope"), dict(pos="learned", norm="layernorm", mlp="gelu"),
                                     dict(value_embed=True, unet_skips=True, tie_embeddings=True),
                                     dict(arch="bigram")])
def test_packed_rows_give_each_conversation_the_logits_it_gets_alone(options):
    model = model_of(**options)
    rows = [[5, 9, 7], [12, 3], [32]]  # conversation lengths per row; the rest of a row is padding
    gen = torch.Generator().manual_seed(1)
    sequences = [[torch.randint(0, 23, (n,), generator=gen) for n in row] for row in rows]
    idx = torch.zeros(len(rows), 32, dtype=torch.long)
    documents = torch.zeros(len(rows), 32, dtype=torch.long)
    for r, row in enumerate(sequences):
        at = 0
        for number, seq in enumerate(row, 1):
            idx[r, at:at + len(seq)] = seq
            documents[r, at:at + len(seq)] = number
            at += len(seq)
        idx[r, at:] = 22  # padding
    with torch.no_grad():
        packed = model(idx, documents=documents)
        plain = model(idx)
    for r, row in enumerate(sequences):
        at = 0
        for seq in row:
            with torch.no_grad():
                alone = model(seq[None])[0]  # the oracle: the conversation in a row of its own
            torch.testing.assert_close(packed[r, at:at + len(seq)], alone, rtol=0, atol=1e-5)
            at += len(seq)
    if options.get("arch") != "bigram":  # and the document ids matter: without them later ones see earlier ones
        assert not torch.allclose(packed[0, 5:21], plain[0, 5:21], atol=1e-3)


def test_positions_restart_and_no_attention_crosses_a_boundary():
    documents = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    packing = Packing(documents)
    assert packing.positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    model = model_of()
    with torch.no_grad(), model.capture("blocks.0.attn.weights", "blocks.1.attn.weights") as seen:
        model(torch.randint(0, 23, (2, 8)), documents=documents)
    same = documents[0][:, None] == documents[0][None, :]
    for layer in (0, 1):
        weights = seen[f"blocks.{layer}.attn.weights"]  # (B, H, T, T)
        assert weights[0][:, ~same].abs().max() == 0  # nothing across conversations
        assert torch.equal(weights[1], torch.tril(weights[1]))  # one document: plain causal
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 8))


# ---------------------------------------------------------------------------------------------------------------
# The masked loss


def test_masked_loss_is_the_mean_cross_entropy_of_the_trained_targets_by_hand():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 5), generator=gen)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    by_hand = []
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                row = logits[b, t].tolist()
                by_hand.append(math.log(sum(math.exp(v) for v in row)) - row[targets[b, t]])
    loss = masked_loss(logits, targets, LossConfig(), mask)
    assert float(loss) == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-12)
    assert float(masked_loss(logits, targets, LossConfig(), mask, torch.tensor(8.0))) == \
        pytest.approx(sum(by_hand) / 8, rel=1e-12)
    with pytest.raises(LmlabError, match="cross_entropy"):
        masked_loss(logits, targets, LossConfig(objective="squared_error"), mask)


def packed_pair(tokenizer: tok.Tokenizer) -> tuple[sft.PackedBatch, list[str]]:
    """Two conversations packed in one block of 64, as training packs them, and each target's role ("system",
    "user", "assistant", or "pad" for the padding and the first token of the next conversation)."""
    second = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    rendered = [chat.render(tokenizer, m) for m in (SYSTEM_USER_ASSISTANT, second)]
    ids, trained, documents = sft.pack_rows(rendered, [[0, 1]], 64, 0)
    roles = []
    for messages, r in zip((SYSTEM_USER_ASSISTANT, second), rendered):
        text_roles = ["pad"]  # the end of text that opens it: predicted from the end of the one before
        for m in messages:  # the template: role token, content, end of turn; an answer's end of turn is the answer's
            text_roles += [m["role"]] * (len(tokenizer.encode(m["content"])) + 2)
        assert len(text_roles) == len(r.ids)
        roles += text_roles
    roles += ["pad"] * (65 - len(roles))
    return sft.to_batch(ids, trained, documents, float(trained[:, 1:].sum()), torch.device("cpu")), roles[1:]


def test_changing_a_user_or_system_target_leaves_the_loss_unchanged_and_an_assistant_target_changes_it():
    tokenizer = tok.ByteTokenizer()
    batch, roles = packed_pair(tokenizer)
    torch.manual_seed(0)
    model = build_model(ModelConfig(block_size=64, n_layer=1, n_head=2, n_embd=16, zero_init_proj=False),
                        tokenizer.vocab_size)
    logits = model(batch.x, documents=batch.documents)
    loss = masked_loss(logits, batch.y, LossConfig(), batch.mask, batch.count)
    trained = [t for t, role in enumerate(roles) if role == "assistant" and batch.mask[0, t]]
    assert len(trained) == 3 + 1 + 1 + 1  # "abc" and its end of turn, "4" and its end of turn
    assert [roles[t] for t in range(64) if batch.mask[0, t]] == ["assistant"] * 6
    for role in ("system", "user", "pad", "assistant"):
        for t in [t for t, r in enumerate(roles) if r == role][:4]:
            y = batch.y.clone()
            y[0, t] = (y[0, t] + 1) % tokenizer.vocab_size
            changed = masked_loss(logits, y, LossConfig(), batch.mask, batch.count)
            if role == "assistant" and batch.mask[0, t]:
                assert changed != loss, (role, t)
            else:
                assert changed == loss, (role, t)


# ---------------------------------------------------------------------------------------------------------------
# The sampler


def rendered_set(count: int = 60, block: int = 96) -> list[chat.Rendered]:
    tasks = synthetic.chat_tasks(0, "train", count)
    return chat.render_all(tok.ByteTokenizer(), [chat.Conversation(t.messages) for t in tasks], block + 1).rendered


def test_the_sampler_packs_whole_conversations_from_its_seed_and_resumes_exactly():
    conversations = rendered_set()
    sampler = sft.PackedSampler(conversations, 96, 4, seed=3, device=torch.device("cpu"))
    first = [sampler.next() for _ in range(3)]
    state = sampler.state_dict()
    after = [sampler.next() for _ in range(3)]
    again = sft.PackedSampler(conversations, 96, 4, seed=3, device=torch.device("cpu"))
    assert all(torch.equal(a.x, b.x) for a, b in zip(first, [again.next() for _ in range(3)]))
    again.load_state_dict(state)
    for a, b in zip(after, [again.next() for _ in range(3)]):
        assert torch.equal(a.x, b.x) and torch.equal(a.documents, b.documents) and torch.equal(a.mask, b.mask)
    other = sft.PackedSampler(conversations, 96, 4, seed=4, device=torch.device("cpu")).next()
    assert not torch.equal(other.x, first[0].x)
    known = {tuple(c.ids.tolist()) for c in conversations}
    for batch in first + after:
        assert float(batch.count) == float(batch.mask.sum())  # one process, one micro-batch: the step's count
        for r in range(4):
            docs, block = batch.documents[r].tolist(), torch.cat([batch.x[r], batch.y[r, -1:]]).tolist()
            numbers = sorted(set(docs) - {0})
            assert numbers and numbers == list(range(1, len(numbers) + 1))  # at least one conversation a block
            for n in numbers:  # each a whole conversation: its tokens are inputs, the last one also a target
                at = [t for t, d in enumerate(docs) if d == n]
                whole = [tuple(block[at[0]:at[-1] + 1]), tuple(block[at[0]:at[-1] + 2])]
                assert whole[0] in known or (at[-1] == 95 and whole[1] in known), (r, n)
            assert all(not batch.mask[r, t] for t, d in enumerate(docs) if d == 0)  # padding is never trained


def test_a_step_is_the_same_blocks_however_it_is_split_over_micro_batches_and_processes():
    conversations = rendered_set()

    def step(batch, accum, world):
        samplers = [sft.PackedSampler(conversations, 96, batch, 7, torch.device("cpu"), accum, r, world)
                    for r in range(world)]
        chunks = {}
        for r, s in enumerate(samplers):
            for a in range(accum):
                chunks[a * world + r] = s.next()
        return [chunks[i] for i in sorted(chunks)]

    whole = step(8, 1, 1)[0]
    for accum, world in ((2, 1), (1, 2), (2, 2)):
        parts = step(8 // (accum * world), accum, world)
        assert torch.equal(torch.cat([p.x for p in parts]), whole.x)
        assert torch.equal(torch.cat([p.mask for p in parts]), whole.mask)
        assert all(float(p.count) == float(whole.mask.sum()) / (accum * world) for p in parts)


def test_a_steps_loss_and_gradient_are_the_mean_over_all_its_trained_tokens_however_it_is_split():
    """The oracle: one micro-batch of 8 blocks. Two of 4 each (gradient accumulation) must give the same loss and
    update, though they hold different numbers of trained tokens."""
    from lmlab.evaluate import autocast_context
    from lmlab.train import train_step

    conversations = rendered_set()
    results = []
    for batch, accum in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = build_model(ModelConfig(block_size=96, n_layer=1, n_head=2, n_embd=16, zero_init_proj=False), 261)
        optimizer = build_optimizer(model, OptimConfig(optimizer="sgd", lr=0.5, weight_decay=0.0))
        sampler = sft.PackedSampler(conversations, 96, batch, 5, torch.device("cpu"), accum)
        micro = [sampler.next() for _ in range(accum)]
        if accum == 2:
            assert micro[0].mask.sum() != micro[1].mask.sum()
        result = train_step(model, optimizer, micro, LossConfig(), 0.0, autocast_context(torch.device("cpu"),
                                                                                          torch.float32),
                            objective=masked_loss)
        results.append((result.loss, model.lm_head.weight.detach().clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Validation


def test_validation_is_the_masked_loss_of_each_held_out_conversation_alone():
    conversations = rendered_set(40)
    torch.manual_seed(0)
    model = build_model(ModelConfig(block_size=96, n_layer=2, n_head=2, n_embd=16, zero_init_proj=False), 261).eval()
    token_bytes = torch.from_numpy(tok.ByteTokenizer().byte_lengths())
    blocks = sft.validation_blocks(conversations, 96)
    assert len(blocks[0]) < len(conversations)  # packed, several a block
    metrics = sft.evaluate_chat(model, blocks, token_bytes, batch_size=3)
    nats, count = 0.0, 0
    with torch.no_grad():
        for c in conversations:
            logits = model(torch.from_numpy(c.ids[None, :-1]))[0]
            trained = torch.from_numpy(c.mask[1:])
            nats += float(cross_entropy(logits[trained], torch.from_numpy(c.ids[1:])[trained], reduction="sum"))
            count += int(trained.sum())
    assert metrics.tokens == count
    assert metrics.loss == pytest.approx(nats / count, rel=1e-5)
    capped = sft.validation_blocks(conversations, 96, max_tokens=200)
    assert 0 < capped[1].sum() < blocks[1].sum()


def test_answers_are_checked_by_the_verifier_and_counted_when_they_end_their_turn(monkeypatch):
    tokenizer = tok.ByteTokenizer()
    tasks = [sft.Task(t.skill, list(t.prompt), chat.render(tokenizer, list(t.prompt), True).ids.tolist())
             for t in synthetic.chat_tasks(0, "heldout", 6)]
    end = tokenizer.special_tokens[tok.END]
    replies = iter([tokenizer.encode(t.answer) + [end] for t in synthetic.chat_tasks(0, "heldout", 3)]
                   + [tokenizer.encode("wrong") + [end], tokenizer.encode("x" * 40), tokenizer.encode("y" * 40)])
    monkeypatch.setattr(sft, "generate", lambda model, ids, n, temperature: iter(next(replies)[:n]))
    result = sft.answer_tasks(torch.nn.Linear(1, 1), tokenizer, tasks)
    skills = [t.skill for t in tasks]
    right = {s: sum(1 for i, t in enumerate(skills) if t == s and i < 3) / skills.count(s) for s in set(skills)}
    assert result == {"exact_match": dict(sorted(right.items())), "ended_turn": 4 / 6}


def test_a_chat_answer_may_end_its_turn_and_stops_there_where_a_text_continuation_never_draws_a_special_token():
    """A bigram whose every next token is the end of a turn (else "a"): validation's answers and the probe of a chat
    prompt stop at once, having ended the turn; the probe of a text prompt, banned from special tokens, writes "a"s."""
    from lmlab.sample import probe

    tokenizer = tok.ByteTokenizer()
    model = build_model(ModelConfig(arch="bigram", block_size=64), tokenizer.vocab_size).eval()
    with torch.no_grad():
        model.table.weight.zero_()
        model.table.weight[:, tokenizer.special_tokens[tok.END]] = 10.0
        model.table.weight[:, ord("a")] = 5.0
    question = synthetic.chat_tasks(0, "heldout", 1)[0]
    task = sft.Task(question.skill, list(question.prompt),
                    chat.render(tokenizer, list(question.prompt), True).ids.tolist())
    assert sft.answer(model, tokenizer, task) == sft.Answer("", True, False)
    assert sft.answer_tasks(model, tokenizer, [task])["ended_turn"] == 1.0
    chat_probe, text_probe = probe(model, tokenizer, [task.ids, "Copy"], continuation=10)
    assert chat_probe["continuation"] == "" and text_probe["continuation"] == "a" * 10
    assert chat_probe["top"][0][0] == tok.END


def test_tasks_spread_over_the_skills():
    conversations = [chat.Conversation(t.messages, t.skill) for t in synthetic.chat_tasks(0, "heldout", 200)]
    tasks = sft.choose_tasks(tok.ByteTokenizer(), conversations, 128, count=20)
    assert len(tasks) == 20 and {t.skill for t in tasks} == set(synthetic.SKILLS)
    assert max(sum(t.skill == s for t in tasks) for s in synthetic.SKILLS) == 4
    assert sft.choose_tasks(tok.ByteTokenizer(), [chat.Conversation(SYSTEM_USER_ASSISTANT)], 128) == []


# ---------------------------------------------------------------------------------------------------------------
# Runs


def test_the_stage_is_part_of_the_config_and_has_its_own_defaults():
    cfg = get_preset("tiny", "sft")
    assert cfg.stage == "sft" and cfg.optim.lr == SFT_DEFAULTS["lr"] and cfg.optim.warmup == SFT_DEFAULTS["warmup"]
    assert cfg.optim.muon_lr == SFT_DEFAULTS["muon_lr"] and cfg.optim.warmup < get_preset("tiny").optim.warmup
    assert cfg.eval_interval == SFT_DEFAULTS["eval_interval"] and cfg.max_time == SFT_DEFAULTS["max_time"]
    assert cfg.model.dropout == 0.0
    filled, _ = apply_budget(dataclasses.replace(cfg, init_from="x"))
    assert filled.model.unset() == ["block_size", "n_layer", "n_head", "n_embd"]  # the base's, when it is read
    assert not filled.compile and filled.optim.muon_momentum == 0.95
    saved = get_preset("tiny").to_json()
    del saved["stage"]  # a run from before stages
    saved["model"].update(block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    saved["optim"].update(lr=1e-2, muon_momentum=0.95)
    assert TrainConfig.from_json(saved).stage == "pretrain"
    with pytest.raises(LmlabError, match="--stage must be pretrain, sft, dpo or rl"):
        get_preset("tiny", "ppo")


def test_an_sft_run_starts_from_the_base_and_trains_only_what_the_assistant_writes(base, tmp_path, capsys):
    from lmlab.run import load_run
    from lmlab.train import train

    data = chats_file(tmp_path / "chats.jsonl")
    summary = train(sft_config(base, str(data), tmp_path / "sft"))
    run = Path(summary["run_dir"])
    config = json.loads((run / "config.json").read_text())
    assert config["stage"] == "sft" and config["init_from"] == str(base)
    base_config = json.loads((base / "config.json").read_text())
    same = {k: v for k, v in base_config["model"].items() if k not in ("dropout", "attn_dropout")}
    assert {k: config["model"][k] for k in same} == same  # the base's model, with the run's dropout
    assert (run / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    records = read_jsonl(run / "metrics.jsonl")
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8] and "exact_match" not in evals[0]  # a file has no verifier
    # step 0 is the base's best checkpoint: the masked loss of the held-out conversations alone, computed here
    loaded = load_run(base)
    chat_data = sft.load_chat_data(sft.read_chat_data(str(data), None, 0.1, 1337), None, loaded.tokenizer, 96,
                                   lambda m: None)
    oracle = sft.evaluate_chat(loaded.model, sft.validation_blocks(chat_data.val, 96),
                               torch.from_numpy(loaded.tokenizer.byte_lengths()))
    assert evals[0]["val_loss"] == pytest.approx(oracle.loss, rel=1e-5)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    # lmlab eval knows the stage: the masked loss of the same held-out conversations at the best checkpoint
    from lmlab.cli import main

    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    best = min(evals, key=lambda r: r["val_loss"])
    assert result["loss"] == pytest.approx(best["val_loss"], rel=1e-5) and result["tokens"] == best["val_tokens"]
    assert result["conversations"] == 12 and "exact_match" not in result  # a file's tenth; no verifier
    assert main(["eval", str(run), "--data", str(data), "--json"]) == 0  # every conversation of a file
    assert json.loads(capsys.readouterr().out)["conversations"] == 120


@pytest.mark.slow  # several seconds: trains, or starts processes
def test_synthetic_chat_logs_exact_match_by_skill_and_ended_turns(base, tmp_path, monkeypatch):
    from lmlab.train import train

    monkeypatch.setattr(synthetic, "CHAT_TRAIN", 300)
    monkeypatch.setattr(synthetic, "CHAT_HELDOUT", 40)
    monkeypatch.setattr(sft, "TASKS", 10)
    summary = train(sft_config(base, "synthetic:chat", tmp_path / "sft", tensorboard=True, probe=True, inside=True,
                               sample_tokens=20))
    run = Path(summary["run_dir"])
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    for record in evals:
        assert set(record["exact_match"]) == set(synthetic.SKILLS) and 0 <= record["ended_turn"] <= 1
        assert "val_stride" not in record
    # lmlab eval answers the same prompts with the best checkpoint
    from lmlab.run import load_run

    result = sft.evaluate_run(load_run(run), None)
    best = min(evals, key=lambda r: r["val_loss"])
    assert result["answers"] == 10 and result["conversations"] == 40
    assert (result["exact_match"], result["ended_turn"]) == (best["exact_match"], best["ended_turn"])
    assert result["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    probes = read_jsonl(run / "probes.jsonl")
    assert probes[0]["probes"][0]["prompt"].endswith(tok.ASSISTANT)  # a held-out prompt, ready to be answered
    assert len(read_jsonl(run / "inside.jsonl")) == len(evals)
    assert read_jsonl(run / "samples.jsonl")[0]["prompt"].endswith(tok.ASSISTANT)
    # the report draws them: one line per skill and the ended turns, for an SFT run only
    from lmlab.report.curves import answers_figure
    from lmlab.report.logs import load_run_logs
    from lmlab.report.page import slug
    from lmlab.report.report_page import build_page

    logs = load_run_logs(run)
    lines = {line.get_label(): list(line.get_ydata()) for line in answers_figure(logs).axes[0].lines}
    for skill in synthetic.SKILLS:
        assert lines[f"{skill} exact match"] == [100 * r["exact_match"][skill] for r in evals]
    assert lines["ended their turn"] == [100 * r["ended_turn"] for r in evals]
    assert f"{slug(logs.name)}_answers.png" in build_page([logs])[1]
    assert not any(name.endswith("_answers.png") for name in build_page([load_run_logs(base)])[1])


def strip_special_tokens(run: Path) -> None:
    """Turn a run into one from before the special tokens: its tokenizer without them (schema 1), and its
    checkpoint's embedding and head without their rows."""
    from lmlab.checkpoint import latest_good_checkpoint, save_checkpoint

    config = json.loads((run / "config.json").read_text())
    tokenizer = tok.load(run / "tokenizer.json")
    old = tok.ByteTokenizer(())
    cfg = TrainConfig.from_json(config)
    model = build_model(cfg.model, tokenizer.vocab_size)
    from safetensors.torch import load_file

    path = latest_good_checkpoint(run)
    state = load_file(path / "model.safetensors")
    model.load_state_dict(state)
    small = build_model(cfg.model, old.vocab_size)
    small.load_state_dict({k: (v[:old.vocab_size] if v.shape[:1] == (tokenizer.vocab_size,) else v)
                           for k, v in model.state_dict().items()})
    import shutil

    shutil.rmtree(run / "checkpoints")
    save_checkpoint(run, 10, small, build_optimizer(small, cfg.optim), {"torch": torch.get_rng_state()},
                    {"tokens": 0, "elapsed_s": 0.0, "val_loss": 1.0}, 1)
    old.save(run / "tokenizer.json")
    config.update(vocab_size=old.vocab_size, tokenizer_fingerprint=old.fingerprint())
    (run / "config.json").write_text(json.dumps(config))


def test_a_base_without_special_tokens_gets_them_with_mean_rows(base, tmp_path, capsys):
    import shutil

    from lmlab.run import load_run
    from lmlab.train import prepare

    old = tmp_path / "old"
    shutil.copytree(base, old)
    strip_special_tokens(old)
    assert tok.load(old / "tokenizer.json").chat_template is None
    before = load_run(old).model
    cfg, _ = apply_budget(sft_config(old, str(chats_file(tmp_path / "chats.jsonl")), tmp_path / "sft"))
    (tmp_path / "sft").mkdir()
    setup, state, _ = prepare(cfg, tmp_path / "sft", Dist())
    err = capsys.readouterr().err
    assert err.count("added the special tokens") == 1 and "<|endoftext|> <|system|>" in err
    assert setup.tokenizer.vocab_size == 256 + 5 and setup.tokenizer.chat_template is not None
    for name in ("wte.weight", "lm_head.weight"):
        grown, was = state.model.state_dict()[name], before.state_dict()[name]
        torch.testing.assert_close(grown[:256], was)
        torch.testing.assert_close(grown[256:], was.mean(0, keepdim=True).expand(5, -1))


def test_an_sft_run_resumes_exactly(base, tmp_path):
    from lmlab.train import train

    data = str(chats_file(tmp_path / "chats.jsonl"))
    options = dict(optim=dataclasses.replace(get_preset("tiny", "sft").optim, schedule="constant", warmup=0))
    train(sft_config(base, data, tmp_path / "whole", **options))
    train(sft_config(base, data, tmp_path / "cut", max_steps=4, **options))
    saved = TrainConfig.from_json(json.loads((tmp_path / "cut" / "config.json").read_text()))
    train(dataclasses.replace(saved, resume=str(tmp_path / "cut"), max_steps=8))

    def losses(run):
        return [(r["step"], r["train_loss"]) for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r]

    assert losses(tmp_path / "cut") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 8
    with pytest.raises(LmlabError, match="--stage cannot change on resume"):
        train(dataclasses.replace(saved, resume=str(tmp_path / "cut"), max_steps=12, stage="pretrain"))


@pytest.mark.slow
def test_an_sft_run_shares_its_rows_between_two_threads_reproducibly(base, tmp_path):
    """--thread-split 2 on packed conversations: the same losses twice, and the one-thread run's up to rounding."""
    from lmlab.train import train

    data = str(chats_file(tmp_path / "chats.jsonl"))

    def losses(name, split):
        train(sft_config(base, data, tmp_path / name, thread_split=split, max_steps=6))
        return [r["train_loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "train_loss" in r]

    split = losses("a", 2)
    assert len(split) == 6 and split == losses("b", 2)
    assert split == pytest.approx(losses("plain", 1), rel=1e-4)


def test_sft_from_a_transformers_model_without_a_chat_template(tmp_path):
    pytest.importorskip("transformers")
    from test_hf import hf_llama, plain_bpe

    from lmlab.train import train

    source = tmp_path / "source"
    source.mkdir()
    hf_llama(source, plain_bpe())
    summary = train(sft_config(source, str(chats_file(tmp_path / "chats.jsonl")), tmp_path / "sft",
                               max_steps=4))
    run = Path(summary["run_dir"])
    tokenizer = tok.load(run / "tokenizer.json")
    assert tokenizer.kind == "bpe" and all(t in tokenizer.special_tokens for t in tok.SPECIAL_TOKENS)
    assert json.loads((run / "config.json").read_text())["model"]["block_size"] == 64  # the model's own


# ---------------------------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("case", ["jsonl", "parquet", "no_base", "text", "objective", "stage"])
def test_the_command_line_refuses_bad_sft_input_in_one_line_with_exit_2(base, tmp_path, case, capsys):
    from lmlab.cli import main

    data = tmp_path / "bad.jsonl"
    args = ["train", "--stage", "sft", "--init-from", str(base), "--max-steps", "2", "--out", str(tmp_path / "r")]
    if case == "jsonl":
        data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                        '{"messages": [{"role": "user", "content": "hi"}]}\n')
        args += ["--data", str(data)]
        expected = "line 2"
    elif case == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = tmp_path / "bad.parquet"
        good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        pq.write_table(pa.table({"messages": [good, good, [{"role": "robot", "content": "x"}]]}), data)
        args += ["--data", str(data)]
        expected = "row 3"
    elif case == "no_base":
        args = ["train", "--stage", "sft", "--data", "synthetic:chat", "--max-steps", "2"]
        expected = "--init-from"
    elif case == "text":
        args += ["--data", str(write_corpus(tmp_path / "corpus.txt"))]
        expected = "trains on conversations"
    elif case == "objective":
        args += ["--data", "synthetic:chat", "--objective", "squared_error"]
        expected = "cross_entropy"
    else:
        args[2] = "chat"
        expected = "--stage must be pretrain, sft, dpo or rl"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lmlab train: error:") and expected in err, err
    assert not (tmp_path / "r" / "config.json").exists()


@pytest.mark.slow  # several seconds: trains, or starts processes
def test_the_command_line_fine_tunes_with_the_sft_defaults(base, tmp_path):
    data = chats_file(tmp_path / "chats.jsonl")
    proc = subprocess.run([sys.executable, "-m", "lmlab", "train", "--stage", "sft", "--init-from", str(base),
                           "--data", str(data), "--max-steps", "3", "--max-time", "0", "--batch-size", "4",
                           "--sample-tokens", "0", "--no-progress", "--out", str(tmp_path / "sft")],
                          cwd=str(tmp_path), env=cli_env(tmp_path / "cache"), capture_output=True, text=True,
                          timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert config["stage"] == "sft" and config["optim"]["lr"] == SFT_DEFAULTS["lr"]
    assert config["optim"]["muon_lr"] == SFT_DEFAULTS["muon_lr"] and config["optim"]["warmup"] == SFT_DEFAULTS["warmup"]


@pytest.mark.slow
def test_crash_test_covers_sft(tmp_path):
    crash_test("sft", tmp_path / "crash")


def test_the_plain_causal_path_builds_no_mask(monkeypatch):
    """Pretraining keeps the plain causal path: no document ids reach the model, no mask is built."""
    calls = []
    original = Packing.__init__
    monkeypatch.setattr(Packing, "__init__", lambda self, documents: calls.append(1) or original(self, documents))
    model = model_of()
    model(torch.randint(0, 23, (2, 8)))
    assert calls == []
    np.testing.assert_array_equal(Packing(torch.zeros(1, 3, dtype=torch.long)).positions.numpy(), [[0, 1, 2]])

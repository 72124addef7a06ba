"""Models out to transformers and back in, checked by transformers itself: logits, greedy generation, tokenizers,
and import from randomly initialised GPT2LMHeadModel and LlamaForCausalLM folders."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import read_jsonl, tiny_config, write_corpus
from lmlab import hf
from lmlab.common import LmlabError
from lmlab.budget import apply_budget
from lmlab.config import get_preset
from lmlab.model import GPT, ModelConfig, build_model
from lmlab.sample import generate
from lmlab.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TEXT = "Naïve café — 日本語 😀\nline two,\ttabs  and  spaces\r\n\n"
CHARS = sorted(set(TEXT + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'-"))
VOCAB = len(CHARS) + 5  # the characters, then lmlab's special tokens


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Every tensor random (norm gains around one, biases and the zero-initialised projections too): a wrong
    permutation or a dropped bias cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.dim() == 1 and name.endswith("weight") and ("norm" in name or ".ln_" in name):
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(std * noise)
    return model


def lmlab_model(seed=0, vocab=VOCAB, **kw) -> GPT:
    cfg = ModelConfig(**{**dict(block_size=16, n_layer=2, n_head=2, n_embd=16, zero_init_proj=True), **kw})
    return randomize(build_model(cfg, vocab), seed).eval()


def until_end_of_text(ids: list[int]) -> list[int]:
    """The ids transformers generates where lmlab's generation gives ids: the same, up to the end of text (the eos
    of an export), which ends it."""
    eot = CharTokenizer(CHARS).special_tokens["<|endoftext|>"]
    return ids[:ids.index(eot) + 1] if eot in ids else ids


def hf_logits(folder: Path, ids: torch.Tensor):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model, model(ids).logits


# (lmlab options, the class they map to): every class, tied and untied, with and without biases where it has them
COMBINATIONS = [
    (dict(pos="learned", norm="layernorm", mlp="gelu", qk_norm=False, tie_embeddings=True), hf.GPT2),
    (dict(pos="learned", norm="layernorm", mlp="gelu_tanh", qk_norm=False, bias=True, norm_eps=1e-6), hf.GPT2),
    (dict(pos="learned", norm="layernorm", mlp="relu2", qk_norm=False, tie_embeddings=True, bias=True,
          mlp_ratio=2.5), hf.GPT2),
    (dict(mlp="swiglu", qk_norm=False, rope_base=500.0), hf.LLAMA),
    (dict(mlp="swiglu", qk_norm=False, tie_embeddings=True, bias=True, norm_eps=1e-5, mlp_hidden=20), hf.LLAMA),
    (dict(mlp="swiglu", qk_norm=True, mlp_ratio=3.0), hf.QWEN3),
    (dict(mlp="swiglu", qk_norm=True, tie_embeddings=True, n_head=4, rope_base=100.0), hf.QWEN3),
    (dict(mlp="relu2", qk_norm=False, bias=True), hf.ARCEE),
    (dict(mlp="gelu", qk_norm=False, tie_embeddings=True), hf.ARCEE),
    (dict(mlp="relu2", qk_norm=True), hf.APERTUS),
    (dict(mlp="gelu_tanh", qk_norm=True, tie_embeddings=True, norm_eps=1e-5), hf.APERTUS),
    (dict(norm="layernorm", mlp="gelu", qk_norm=False), hf.NEOX),
    (dict(norm="layernorm", mlp="relu2", qk_norm=False, tie_embeddings=True, bias=True, rope_base=300.0), hf.NEOX),
]


@pytest.mark.parametrize("options,arch", COMBINATIONS, ids=[f"{a}-{i}" for i, (_, a) in enumerate(COMBINATIONS)])
def test_export_matches_transformers_logits_and_greedy_generation(tmp_path, options, arch):
    model = lmlab_model(seed=len(options), **options)
    assert hf.architecture(model.cfg) == arch
    assert hf.write_hf(model, CharTokenizer(CHARS), tmp_path) == arch
    config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in config and config["eos_token_id"] is None and config["bos_token_id"] is None
    ids = torch.randint(len(CHARS), (2, 16), generator=torch.Generator().manual_seed(1))
    theirs_model, theirs = hf_logits(tmp_path, ids)
    assert type(theirs_model).__name__ == arch
    with torch.no_grad():
        ours = model(ids)
    assert float((ours - theirs).abs().max()) < hf.TOLERANCE
    # greedy decoding, KV-cached on both sides, up to the context length
    prompt = ids[0, :3].tolist()
    expected = until_end_of_text(list(generate(model, prompt, 16 - len(prompt), temperature=0.0)))
    out = theirs_model.generate(torch.tensor([prompt]), max_new_tokens=16 - len(prompt), do_sample=False,
                                use_cache=True, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert out[0, len(prompt):].tolist() == expected


def test_the_default_and_nanogpt_presets_export_and_verify(tmp_path):
    tiny, _ = apply_budget(get_preset("tiny"))
    expected = {"tiny": hf.APERTUS, "nanogpt-char": hf.GPT2, "nanogpt-char-cpu": hf.GPT2, "gpt2-124m": hf.GPT2,
                "small": hf.APERTUS}
    for name, arch in expected.items():
        cfg = tiny.model if name == "tiny" else get_preset(name).model
        assert hf.architecture(cfg) == arch, name
    for name, cfg in (("tiny", tiny.model), ("nanogpt-char-cpu", get_preset("nanogpt-char-cpu").model)):
        model = randomize(build_model(cfg, 65), std=0.1).eval()
        tokenizer = CharTokenizer([chr(32 + i) for i in range(64)] + ["\n"])
        hf.write_hf(model, tokenizer, tmp_path / name)
        summary = hf.verify(tmp_path / name, model, tokenizer)
        assert summary.startswith("verified") and "largest |logit difference|" in summary


def test_unmappable_options_are_refused_naming_the_option_and_the_nearest_that_maps():
    cases = [
        (dict(arch="bigram"), "--arch bigram", "gpt architecture"),
        (dict(pos="learned", norm="rmsnorm", qk_norm=False), "--pos learned with --norm rmsnorm", "--norm layernorm"),
        (dict(pos="learned", norm="layernorm", mlp="swiglu", qk_norm=False), "--mlp swiglu", "--mlp gelu"),
        (dict(pos="learned", norm="layernorm", qk_norm=True), "--qk-norm", "--no-qk-norm"),
        (dict(norm="layernorm", mlp="swiglu", qk_norm=False), "--mlp swiglu", "--norm rmsnorm"),
        (dict(norm="layernorm", qk_norm=True), "--qk-norm", "--no-qk-norm"),
        (dict(qk_norm=True, bias=True), "--bias with --qk-norm", "--no-bias"),
        (dict(logit_softcap=15.0), "--logit-softcap", "--logit-softcap 0"),
        (dict(value_embed=True), "--value-embed", "--no-value-embed"),
        (dict(unet_skips=True), "--unet-skips", "--no-unet-skips"),
    ]
    for options, option, nearest in cases:
        with pytest.raises(LmlabError) as e:
            hf.architecture(ModelConfig(**options))
        assert option in str(e.value) and nearest in str(e.value) and "\n" not in str(e.value)


def bpe_tokenizer() -> BPETokenizer:
    return BPETokenizer.train(iter([TEXT * 20 + "the cat sat on the mat. " * 50]), 300)


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_autotokenizer_gives_the_same_ids_and_round_trip(tmp_path, kind):
    tokenizer = {"char": lambda: CharTokenizer(CHARS), "byte": ByteTokenizer, "bpe": bpe_tokenizer}[kind]()
    model = lmlab_model(vocab=tokenizer.vocab_size)
    hf.write_hf(model, tokenizer, tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in (TEXT, "  leading spaces\n\nand a trailing newline\n", "a"):
        ids = tokenizer.encode(text)
        assert theirs(text)["input_ids"] == ids  # no BOS/EOS added
        assert theirs.decode(ids) == text == tokenizer.decode(ids)
    if kind == "char":
        with pytest.raises(Exception, match="UNK|unk"):  # an unknown character is an error there too
            theirs("not in the vocabulary: ß")
    # and back: the same lmlab tokenizer
    back = hf.tokenizer_from_hf(json.loads((tmp_path / "tokenizer.json").read_text()), "tokenizer.json")
    assert back.kind == tokenizer.kind and back.fingerprint() == tokenizer.fingerprint()


def test_pipeline_generates_greedy_text_equal_to_lmlabs(tmp_path):
    model = lmlab_model(seed=3, mlp="relu2", qk_norm=True)  # the tiny preset's shape of model
    tokenizer = CharTokenizer(CHARS)
    hf.write_hf(model, tokenizer, tmp_path)
    prompt = "the "
    ids = list(generate(model, tokenizer.encode(prompt), 12, temperature=0.0))
    # the pipeline's text leaves out special tokens (this random model writes some) and ends at the end of text
    expected = tokenizer.decode(i for i in until_end_of_text(ids) if i not in tokenizer.special_tokens.values())
    pipe = transformers.pipeline("text-generation", model=str(tmp_path))
    out = pipe(prompt, max_new_tokens=12, do_sample=False, return_full_text=False)
    assert out[0]["generated_text"] == expected
    assert set(ids) & set(tokenizer.special_tokens.values())  # so the comparison above covers them


def test_verification_fails_on_a_wrong_export_and_says_when_transformers_is_missing(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    model = lmlab_model(seed=4, mlp="swiglu", qk_norm=False)
    tokenizer = CharTokenizer(CHARS)
    hf.write_hf(model, tokenizer, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    q = tensors["model.layers.0.self_attn.q_proj.weight"]  # lmlab's RoPE pair order, not rotate_half's
    tensors["model.layers.0.self_attn.q_proj.weight"] = q.reshape(2, 4, 2, 16).transpose(1, 2).reshape(16, 16)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LmlabError, match="differ from lmlab's by up to"):
        hf.verify(tmp_path, model, tokenizer)
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert hf.verify(tmp_path, model, tokenizer) is None


# ---------------------------------------------------------------------------------------------------------------
# Import


def save_tokenizer(folder: Path, tokenizer: BPETokenizer, bos: bool = False) -> None:
    """A byte-level BPE tokenizer.json; with bos, GPT-2's <|endoftext|> is added and put before every text by a
    post-processor, as Llama 3's tokenizer does with its BOS (lmlab encodes text without it)."""
    from tokenizers import Tokenizer, processors

    t = Tokenizer.from_str(tokenizer.hf.to_str())
    if bos:
        t.add_special_tokens(["<|endoftext|>"])
        special = ("<|endoftext|>", t.token_to_id("<|endoftext|>"))
        t.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[special])
    t.save(str(folder / "tokenizer.json"))


def hf_gpt2(folder: Path, tokenizer) -> torch.nn.Module:
    vocab = tokenizer.vocab_size + 1  # with <|endoftext|>
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, n_inner=24,
                                     activation_function="gelu_new", bos_token_id=None, eos_token_id=None)
    model = randomize(transformers.GPT2LMHeadModel(config), seed=5, std=0.2).eval()
    model.save_pretrained(str(folder))
    save_tokenizer(folder, tokenizer, bos=True)
    return model


def hf_llama(folder: Path, tokenizer) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=40,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                      rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    model = randomize(transformers.LlamaForCausalLM(config), seed=6, std=0.2).eval()
    model.save_pretrained(str(folder))
    save_tokenizer(folder, tokenizer)
    return model


@pytest.fixture(scope="module")
def bpe():
    return plain_bpe()


def plain_bpe() -> BPETokenizer:
    """A byte-level BPE trained by `tokenizers` itself, without lmlab's special tokens, as GPT-2's and Llama's are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf_tokenizer = Tokenizer(models.BPE())
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf_tokenizer.train_from_iterator([TEXT * 20 + "the cat sat on the mat. " * 50], trainer=trainer)
    return BPETokenizer(hf_tokenizer)


@pytest.mark.parametrize("make,arch", [(hf_gpt2, hf.GPT2), (hf_llama, hf.LLAMA)])
def test_import_gives_transformers_logits(tmp_path, bpe, make, arch):
    theirs = make(tmp_path, bpe)
    imported = hf.load_hf(str(tmp_path))
    assert imported.arch == arch and imported.model.block_size == imported.positions
    model = build_model(imported.model, imported.tokenizer.vocab_size)
    model.load_state_dict(imported.state)
    model.eval()
    ids = torch.randint(imported.tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert float((model(ids) - theirs(ids).logits).abs().max()) < hf.TOLERANCE
    # the tokenizer: the same ids as the file's, without the BOS its post-processor adds
    from tokenizers import Tokenizer

    from_file = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    file_ids = from_file.encode(TEXT, add_special_tokens=False).ids
    assert imported.tokenizer.encode(TEXT) == file_ids and imported.tokenizer.decode(file_ids) == TEXT
    if arch == hf.GPT2:
        assert from_file.encode(TEXT).ids == [bpe.vocab_size] + file_ids  # what lmlab leaves out


@pytest.mark.parametrize("options", [c[0] for c in COMBINATIONS[::2]] + [dict(mlp="relu2", qk_norm=True,
                                                                              zero_init_proj=False, dropout=0.1)])
def test_lmlab_to_hf_to_lmlab_gives_identical_weights(tmp_path, options):
    model = lmlab_model(seed=7, **options)
    hf.write_hf(model, CharTokenizer(CHARS), tmp_path)
    imported = hf.load_hf(str(tmp_path), model.cfg)
    state = model.state_dict()
    assert imported.state.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(imported.state[name], t), name
    same = {f.name for f in dataclasses.fields(ModelConfig)} - {"mlp_hidden", "norm_eps", "mlp_ratio"}
    assert {n: getattr(imported.model, n) for n in same} == {n: getattr(model.cfg, n) for n in same}
    assert imported.tokenizer.fingerprint() == CharTokenizer(CHARS).fingerprint()


GPT2_CONFIG = dict(vocab_size=50, architectures=["GPT2LMHeadModel"], model_type="gpt2")
LLAMA_CONFIG = dict(vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                    architectures=["LlamaForCausalLM"], model_type="llama")
NEOX_CONFIG = dict(vocab_size=50, hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   rotary_pct=1.0, use_parallel_residual=False, model_type="gpt_neox")
QWEN3_CONFIG = dict(LLAMA_CONFIG, head_dim=8, architectures=["Qwen3ForCausalLM"], model_type="qwen3")


@pytest.mark.parametrize("base,change,message", [
    (GPT2_CONFIG, dict(scale_attn_weights=False), "attention scaled other than by 1/sqrt"),
    (GPT2_CONFIG, dict(scale_attn_by_inverse_layer_idx=True), "attention scaled other than by 1/sqrt"),
    (GPT2_CONFIG, dict(add_cross_attention=True), "lmlab is decoder-only"),
    (GPT2_CONFIG, dict(activation_function="swish"), "activation 'swish'"),
    (GPT2_CONFIG, dict(n_positions=0), "the context length must be positive"),
    (GPT2_CONFIG, dict(layer_norm_epsilon="small"), "layer_norm_epsilon must be a finite number"),
    (GPT2_CONFIG, dict(add_cross_attention=1), "add_cross_attention must be bool"),
    (NEOX_CONFIG, dict(use_parallel_residual=True), "use_parallel_residual does not fit"),
    (NEOX_CONFIG, dict(rotary_pct=0.25), "rotary on 0.25 of each head"),
    (QWEN3_CONFIG, dict(use_sliding_window=True), "use_sliding_window does not fit"),
    (dict(QWEN3_CONFIG, head_dim=8), dict(head_dim=4), "head_dim 4"),
    ({k: v for k, v in QWEN3_CONFIG.items() if k != "head_dim"}, {}, "head_dim 128"),  # Qwen3's default
    (LLAMA_CONFIG, dict(num_attention_heads=3), "divisible by num_attention_heads"),
    (LLAMA_CONFIG, dict(hidden_size=None), "must be positive ints"),
    (LLAMA_CONFIG, dict(vocab_size=0), "vocab_size must be a positive int"),
    (LLAMA_CONFIG, dict(rope_theta=float("inf")), "rope_theta must be a positive finite number"),
    (LLAMA_CONFIG, dict(architectures=None, model_type=3), "model_type must be a string"),
])
def test_a_config_lmlab_cannot_express_is_refused_naming_the_field(base, change, message):
    with pytest.raises(LmlabError, match=message):
        hf.read_hf_config({**base, **change}, "config.json")


def test_each_class_reads_into_the_model_it_describes():
    """Each family's fields, and the defaults of the ones a config leaves out, as lmlab's ModelConfig."""
    gpt2 = hf.read_hf_config(GPT2_CONFIG, "config.json")
    assert (gpt2.arch, gpt2.vocab_size) == ("GPT2LMHeadModel", 50)
    m = gpt2.model
    assert (m.n_embd, m.n_layer, m.n_head, m.block_size, m.mlp_hidden) == (768, 12, 12, 1024, 3072)
    assert (m.pos, m.norm, m.mlp, m.norm_eps, m.tie_embeddings, m.qk_norm) == ("learned", "layernorm", "gelu_tanh",
                                                                              1e-5, True, False)
    assert gpt2.hf_bias == {"attn": True, "mlp": True, "norm": True}
    neox = hf.read_hf_config(dict(NEOX_CONFIG, attention_bias=False), "config.json")
    m = neox.model
    assert (neox.arch, m.n_embd, m.n_layer, m.n_head, m.block_size, m.mlp_hidden) == ("GPTNeoXForCausalLM", 16, 2, 4,
                                                                                     2048, 64)
    assert (m.pos, m.norm, m.mlp, m.norm_eps, m.tie_embeddings, m.rope_base) == ("rope", "layernorm", "gelu", 1e-5,
                                                                                 False, 10000.0)
    assert neox.hf_bias == {"attn": False, "mlp": True, "norm": True}
    qwen = hf.read_hf_config(dict(QWEN3_CONFIG, rope_theta=1e6, mlp_bias=True), "config.json")
    m = qwen.model
    assert (m.norm, m.mlp, m.norm_eps, m.qk_norm, m.rope_base) == ("rmsnorm", "swiglu", 1e-6, True, 1e6)
    assert qwen.hf_bias == {"attn": False, "mlp": False, "norm": False}  # Qwen3 has no MLP bias to read
    llama = hf.read_hf_config(dict(LLAMA_CONFIG, mlp_bias=True, rms_norm_eps=1e-5), "config.json")
    assert (llama.model.qk_norm, llama.model.norm_eps, llama.hf_bias["mlp"]) == (False, 1e-5, True)


def test_import_refuses_what_lmlab_cannot_express(tmp_path, bpe):
    cases = [
        (dict(num_key_value_heads=1), "grouped-query attention"),
        (dict(head_dim=4), "head_dim 4"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "RoPE scaling"),
    ]
    base = dict(vocab_size=bpe.vocab_size, hidden_size=16, intermediate_size=40, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, architectures=["LlamaForCausalLM"], model_type="llama")
    for change, message in cases:
        with pytest.raises(LmlabError, match=message):
            hf.read_hf_config({**base, **change}, "config.json")
    with pytest.raises(LmlabError, match="lmlab imports GPT2LMHeadModel"):
        hf.read_hf_config({**base, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "config.json")
    # pickled weights: refused, saying why, before anything is unpickled
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(base))
    save_tokenizer(folder, bpe)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(LmlabError, match="pytorch_model.bin, a pickle.*can run code"):
        hf.load_hf(str(folder))
    with pytest.raises(LmlabError, match="not a folder, and not a hub id"):
        hf.load_hf(str(tmp_path / "missing" / ".." / "x"))


class Logits(torch.nn.Module):
    """A transformers model as lmlab's evaluation calls a model: token ids in, logits out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(idx).logits


def fine_tune(tmp_path: Path, bpe, make) -> tuple[Path, Path, torch.nn.Module]:
    """A transformers model saved in a folder, then a run started from it (--init-from) for 12 steps."""
    from lmlab.train import train

    source = tmp_path / "source"
    source.mkdir()
    theirs = make(source, bpe)
    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=150)
    train(tiny_config(corpus, tmp_path / "run", init_from=str(source), max_steps=12, eval_interval=12,
                      optim_lr=1e-2, model_block_size=24))
    return tmp_path / "run", source, theirs


@pytest.mark.parametrize("make,arch", [(hf_gpt2, hf.GPT2), (hf_llama, hf.LLAMA)])
def test_init_from_starts_at_transformers_loss_and_fine_tunes(tmp_path, bpe, make, arch):
    from lmlab.run import load_run
    from lmlab.config import TrainConfig
    from lmlab.data import load_splits
    from lmlab.evaluate import evaluate

    run, source, theirs = fine_tune(tmp_path, bpe, make)
    saved = json.loads((run / "config.json").read_text())
    expected = {hf.GPT2: dict(pos="learned", norm="layernorm", mlp="gelu_tanh", mlp_hidden=24, bias=True,
                              tie_embeddings=True, norm_eps=1e-5),
                hf.LLAMA: dict(pos="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=40, bias=False,
                               tie_embeddings=False, norm_eps=1e-5, rope_base=500.0)}[arch]
    assert {k: saved["model"][k] for k in expected} == expected and saved["model"]["block_size"] == 24
    assert saved["data"]["tokenizer"] == "bpe" and saved["init_from"] == str(source)
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 12
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.1
    # step 0 was transformers' model: its validation loss, over the same windows, is what lmlab logged
    loaded = load_run(run)
    val = load_splits(TrainConfig.from_json(saved).data, tokenizer=loaded.tokenizer).val
    m = evaluate(Logits(theirs), val, torch.from_numpy(loaded.tokenizer.byte_lengths()), 24, 4)
    assert m.loss == pytest.approx(evals[0]["val_loss"], abs=1e-4)


@pytest.mark.slow
def test_every_command_works_on_an_imported_run(tmp_path, bpe, capsys):
    import shutil

    from lmlab.run import load_run
    from lmlab.cli import main
    from lmlab.serve.completions import Sampling
    from lmlab.serve.playground import next_token_view, surprisal_view

    run, source, _ = fine_tune(tmp_path, bpe, hf_gpt2)
    shutil.rmtree(source)  # a resume goes on from the run's checkpoint
    for args in (["train", "--resume", str(run), "--max-steps", "14", "--no-progress"],
                 ["sample", str(run), "--prompt", "the cat", "--max-new-tokens", "10", "--temperature", "0"],
                 ["eval", str(run), "--json"], ["next", str(run), "the cat", "--json"],
                 ["surprisal", str(run), "--text", "the cat sees a dog.", "--json"],
                 ["report", str(run), "--out", str(tmp_path / "report.html")],
                 ["export", str(run), "--out", str(tmp_path / "hf"), "--format", "hf"]):
        assert main(args) == 0, (args, capsys.readouterr().err[-2000:])
    err = capsys.readouterr().err
    assert "verified with transformers" in err and "GPT2LMHeadModel" in err
    assert main(["export", str(run), "--out", str(tmp_path / "unchecked"), "--format", "hf", "--no-verify"]) == 0
    assert "verified" not in capsys.readouterr().err and (tmp_path / "unchecked" / "model.safetensors").exists()
    assert read_jsonl(run / "metrics.jsonl")[-1]["step"] == 14
    loaded = load_run(run)
    assert len(next_token_view(loaded, "the cat", Sampling(), 5, False, 0)["rows"]) == 5
    assert surprisal_view(loaded, "the cat sees a dog.")["per_token"]


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


@pytest.mark.parametrize("where", ["tokenizer_config", "named_list", "chat_template.jinja"])
def test_an_imported_tokenizer_keeps_its_chat_template_and_renders_as_transformers_does(tmp_path, bpe, where):
    from tokenizers import Tokenizer

    from lmlab import chat
    from lmlab.tokenizer import from_json

    inner = Tokenizer.from_str(bpe.hf.to_str())
    inner.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    inner.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
              "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True}}  # older configs
    if where == "tokenizer_config":
        config["chat_template"] = CHATML
    elif where == "named_list":
        config["chat_template"] = [{"name": "tool_use", "template": "{{ 1 }}"}, {"name": "default", "template": CHATML}]
    else:
        (tmp_path / "chat_template.jinja").write_text(CHATML)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = hf.tokenizer_from_hf(json.loads((tmp_path / "tokenizer.json").read_text()), "tokenizer.json",
                                hf.tokenizer_config_of(tmp_path))
    assert ours.chat_template == CHATML and ours.eos_token == "<|im_end|>" and ours.bos_token is None
    assert ours.stop_ids == [inner.token_to_id("<|im_end|>")]
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat?"},
                {"role": "assistant", "content": "sat on the mat."}, {"role": "user", "content": "and then?"}]
    expected = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert chat.render(ours, messages, add_generation_prompt=True).ids.tolist() == expected
    back = from_json(json.loads(json.dumps(ours.to_json())))  # as a run folder keeps it
    assert back.chat_template == CHATML and back.fingerprint() == ours.fingerprint()
    assert chat.render(back, messages, add_generation_prompt=True).ids.tolist() == expected

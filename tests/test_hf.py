"""Hugging Face interop: lathe and transformers agree on logits in both directions, weights survive a
round trip bit for bit, the exported tokenizer encodes like lathe's, bad configs name the field."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import models  # noqa: E402

from lathe import cli  # noqa: E402
from lathe.chat import render_chat  # noqa: E402
from lathe.config import ModelConfig, TokenizerConfig  # noqa: E402
from lathe.errors import LatheError  # noqa: E402
from lathe.interop.hf import export_hf, import_hf  # noqa: E402
from lathe.model import GPT  # noqa: E402
from lathe.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from lathe.train.checkpoint import load_model, save_checkpoint  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB = 96
TEXTS = ["hello world, the quick brown fox 12345", "def f(x):\n    return x * 2\n", "héllo wörld 日本語 café ✓"]


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights and biases too), so a swapped or transposed tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def tokens(n=2, t=20, vocab=VOCAB):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def lathe_logits(model, x):
    with torch.no_grad():
        return model(x)[0]


# --- import --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_import_gpt2_matches_transformers(tmp_path, tied):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=40,
                                     tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1)
    hf = randomize(transformers.GPT2LMHeadModel(config))
    hf.save_pretrained(tmp_path)
    model, tok = import_hf(tmp_path)
    assert tok is None
    assert (model.cfg.norm, model.cfg.pos_emb, model.cfg.mlp, model.cfg.bias) == ("layernorm", "learned", "gelu", True)
    assert (model.lm_head.weight is model.embed.weight) == tied
    x = tokens()
    expected = hf_logits(hf, x)
    assert expected.std() > 0.1  # not a trivially flat output
    assert torch.allclose(lathe_logits(model, x), expected, atol=1e-4)


@pytest.mark.parametrize("kw", [
    dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500.0),
    dict(num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5),
])
def test_import_llama_matches_transformers(tmp_path, kw):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=2, **kw)
    hf = randomize(transformers.LlamaForCausalLM(config))
    hf.save_pretrained(tmp_path, max_shard_size="40KB")  # sharded: exercises model.safetensors.index.json
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, _ = import_hf(tmp_path)
    assert model.cfg.n_kv_head == kw["num_key_value_heads"] and model.cfg.bias == kw.get("attention_bias", False)
    x = tokens(t=30)
    assert torch.allclose(lathe_logits(model, x), hf_logits(hf, x), atol=1e-4)


# --- export --------------------------------------------------------------------------------------
EXPORT_CONFIGS = {
    "llama_gqa_tied": dict(n_kv_head=2),
    "llama_bias_untied": dict(bias=True, tie_embeddings=False, rope_theta=300.0, norm_eps=1e-6),
    "gpt2": dict(norm="layernorm", pos_emb="learned", mlp="gelu", bias=True),
}


@pytest.mark.parametrize("name", EXPORT_CONFIGS)
def test_export_loads_in_transformers_and_round_trips(tmp_path, name):
    torch.manual_seed(0)
    model = randomize(GPT(ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, block_size=48,
                                      **EXPORT_CONFIGS[name])))
    export_hf(model, None, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if name == "gpt2" else "LlamaForCausalLM")
    x = tokens(t=40)
    assert torch.allclose(hf_logits(hf, x), lathe_logits(model, x), atol=1e-4)

    back, _ = import_hf(tmp_path / "hf")
    original = model.state_dict()
    assert back.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in back.state_dict().items())


def test_gpt2_export_of_a_bias_free_model_writes_zero_biases(tmp_path):
    model = randomize(GPT(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=24,
                                      norm="layernorm", pos_emb="learned", mlp="gelu", bias=False)))
    export_hf(model, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(t=20)
    assert torch.allclose(hf_logits(hf, x), lathe_logits(model, x), atol=1e-4)


def test_export_refuses_models_neither_llama_nor_gpt2(tmp_path):
    model = GPT(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=24, pos_emb="learned"))
    with pytest.raises(LatheError, match="model.pos_emb"):
        export_hf(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- tokenizer -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lathe_tok() -> Tokenizer:
    return train_tokenizer(TEXTS * 3, TokenizerConfig(vocab_size=300, min_frequency=1))


def test_exported_tokenizer_encodes_like_lathe(tmp_path, lathe_tok):
    model = GPT(ModelConfig(vocab_size=lathe_tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=64))
    export_hf(model, lathe_tok, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1, 2)
    for text in [*TEXTS, "  spaces  and\ttabs 2024-01-01", "new words: zebra quartz"]:
        ids = hf_tok.encode(text)
        assert ids == lathe_tok.encode(text)
        assert hf_tok.decode(ids) == text

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add 12 and 30"},
                {"role": "assistant", "content": "calling", "tool_calls": [{"name": "add", "arguments": {"a": 12, "b": "é"}}]},
                {"role": "tool", "content": "42"}, {"role": "assistant", "content": "it is 42"}]
    for prompt in (False, True):
        ids, mask = render_chat(lathe_tok, messages, add_generation_prompt=prompt)
        out = hf_tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        assert list(out["input_ids"]) == ids
        assert [bool(m) for m in out["assistant_masks"]] == mask  # the tokens lathe's SFT learns

    _, back = import_hf(tmp_path)  # a lathe tokenizer comes back as one
    assert back is not None and back.encode(TEXTS[2]) == lathe_tok.encode(TEXTS[2])


def test_a_foreign_tokenizer_is_not_wrapped(tmp_path):
    export_hf(GPT(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=24)), None, tmp_path)
    HFTokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))  # no lathe special tokens at 0..12
    model, tok = import_hf(tmp_path)
    assert tok is None and model.cfg.vocab_size == VOCAB


# --- bad input -----------------------------------------------------------------------------------
LLAMA_CONFIG = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 64, "hidden_act": "silu", "rms_norm_eps": 1e-6}


@pytest.mark.parametrize("change, field", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters"),
    ({"sliding_window": 16}, "sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True, "mlp_bias": False}, "attention_bias"),
    ({"head_dim": 16}, "head_dim"),
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_attention_heads": 5}, "n_embd"),  # 32 is not divisible by 5: reported through lathe's own check
])
def test_bad_config_names_the_field(tmp_path, change, field):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, **change}))
    with pytest.raises(LatheError, match=field) as err:
        import_hf(tmp_path)
    assert "config.json" in str(err.value)


def test_unreadable_config_and_mismatched_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n "vocab_size": }')
    with pytest.raises(LatheError, match=r"config.json:2"):
        import_hf(tmp_path)
    folder = export_hf(GPT(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=24)), None,
                       tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(LatheError, match="model.layers.1"):
        import_hf(folder)


# --- CLI -----------------------------------------------------------------------------------------
def test_cli_export_import_and_adapter_merge(tmp_path, monkeypatch, lathe_tok, capsys):
    from lathe.finetune.lora import LoraConfig, adapter_parameters, apply_lora, save_adapter

    monkeypatch.setattr(cli, "EXTENSIONS", ["lathe.interop.cli"])  # these verbs, whatever other areas register
    run = tmp_path / "base"
    model = randomize(GPT(ModelConfig(vocab_size=lathe_tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=32)))
    save_checkpoint(run / "checkpoints", 5, model, None, {})
    lathe_tok.save(run / "tokenizer.json")

    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert cli.main(["import", str(tmp_path / "hf"), "--name", str(tmp_path / "imported")]) == 0
    imported = load_model(tmp_path / "imported")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in imported.state_dict().items())
    assert (tmp_path / "imported" / "tokenizer.json").exists() and (tmp_path / "imported" / "recipe.yaml").exists()

    peft_model = apply_lora(imported, LoraConfig(rank=2, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for p in adapter_parameters(peft_model).values():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    save_adapter(peft_model, tmp_path / "adapter")
    assert cli.main(["adapter", "merge", "--base", str(tmp_path / "imported"), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    x = tokens(t=16, vocab=lathe_tok.vocab_size)
    assert torch.allclose(lathe_logits(merged, x), lathe_logits(peft_model, x), atol=1e-5)
    assert not torch.allclose(lathe_logits(merged, x), lathe_logits(model, x), atol=1e-3)

    # the new run works with the ordinary stage verbs
    assert cli.main(["generate", "--run", str(tmp_path / "merged"), "--prompt", "hello", "--max-tokens", "4",
                     "--num-samples", "1", "--temperature", "0"]) == 0
    assert "hello" in capsys.readouterr().out
    assert cli.main(["import", str(tmp_path / "missing"), "--name", str(tmp_path / "x")]) == 2
    assert cli.main(["import", str(tmp_path / "hf"), "--name", str(tmp_path / "merged")]) == 2  # never over a run
    assert "already holds a run" in capsys.readouterr().err

"""LoRA through peft on lathe's GPT: training touches only adapters, merging is exact, adapters are
small files that load back; the autopilot switches adapters over one untouched base."""

import pytest
import torch

pytest.importorskip("peft")
from lathe.config import ModelConfig, TokenizerConfig, TrainConfig  # noqa: E402
from lathe.errors import LatheError  # noqa: E402
from lathe.finetune.autopilot import Autopilot  # noqa: E402
from lathe.finetune.lora import (LoraConfig, adapter_parameters, apply_lora, load_adapter,  # noqa: E402
                                 is_lora_model, merge_adapter, save_adapter)
from lathe.model import GPT  # noqa: E402
from lathe.tokenizer import train_tokenizer  # noqa: E402
from lathe.train.loop import train  # noqa: E402

VOCAB = 300  # the smallest lathe tokenizer's size
CFG = ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32)


def base_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def snapshot(model) -> dict[str, torch.Tensor]:
    """Base weights by their plain GPT names (peft renames wrapped layers to '<name>.base_layer')."""
    return {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
            for n, p in model.named_parameters() if ".lora_" not in n}


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)[0]


def randomize_adapters(peft_model, seed: int) -> None:
    """A fresh adapter is an exact no-op (B = 0); random weights make it act like a trained one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(peft_model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


X = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def test_training_updates_only_adapters_and_merge_is_exact(tmp_path):
    model = base_model()
    before = snapshot(model)
    peft_model = apply_lora(model, LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert torch.equal(logits(peft_model, X), logits(base_model(), X))  # B = 0 at start
    adapters_before = {n: p.detach().clone() for n, p in adapter_parameters(peft_model).items()}

    data = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(batch_size=4, max_steps=4, lr=1e-2, warmup_steps=0, log_every=1, checkpoint_every=100,
                      device="cpu", dtype="float32")
    result = train(peft_model, cfg, lambda i: (data[:, :-1], data[:, 1:]), None, tmp_path, stage="lora")
    assert result.step == 4

    after = snapshot(peft_model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit-identical base
    assert any(not torch.equal(p, adapters_before[n]) for n, p in adapter_parameters(peft_model).items())

    adapted = logits(peft_model, X)
    merged = merge_adapter(peft_model)
    assert type(merged) is GPT and not any(".lora_" in n for n, _ in merged.named_parameters())
    assert all(p.requires_grad for p in merged.parameters())
    assert torch.allclose(logits(merged, X), adapted, atol=1e-5)
    assert not torch.allclose(adapted, logits(base_model(), X), atol=1e-4)
    assert torch.equal(logits(peft_model, X), adapted)  # merge_adapter left the peft model as it was


def test_adapter_file_is_small_and_round_trips(tmp_path):
    peft_model = apply_lora(base_model(), LoraConfig(rank=2, dropout=0.1))
    randomize_adapters(peft_model, seed=5)
    folder = save_adapter(peft_model, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "lathe_base.json"]
    base_bytes = sum(p.numel() * p.element_size() for p in base_model().parameters())
    assert (folder / "adapter_model.safetensors").stat().st_size < base_bytes / 10

    loaded = load_adapter(base_model(), folder)
    assert torch.equal(logits(loaded, X), logits(peft_model, X))
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default
    assert loaded.peft_config["default"].lora_dropout == 0.1 and loaded.peft_config["default"].r == 2


def test_bad_targets_and_mismatched_bases_are_clear_errors(tmp_path):
    with pytest.raises(LatheError, match="'qproj' matches no layer"):
        apply_lora(base_model(), LoraConfig(target_modules=["qproj"]))
    with pytest.raises(LatheError, match="'attn' matches 'blocks.0.attn', a Attention"):
        apply_lora(base_model(), LoraConfig(target_modules=["attn"]))
    with pytest.raises(LatheError, match="tied"):
        apply_lora(base_model(), LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(LatheError, match="not an adapter folder"):
        load_adapter(base_model(), tmp_path)

    folder = save_adapter(apply_lora(base_model(), LoraConfig()), tmp_path / "a")
    torch.manual_seed(0)
    wider = GPT(CFG.model_copy(update={"n_embd": 48}))
    with pytest.raises(LatheError, match="n_embd=32"):
        load_adapter(wider, folder)
    (folder / "lathe_base.json").unlink()  # as written by peft itself: the weights' shapes still disagree
    wider = GPT(CFG.model_copy(update={"n_embd": 48}))
    with pytest.raises(LatheError, match="do not fit the base"):
        load_adapter(wider, folder)
    assert not is_lora_model(wider)  # a failed load leaves the model as it was


def test_autopilot_switches_adapters_over_one_frozen_base(tmp_path):
    folders = {}
    for name, seed in [("math", 1), ("code", 2)]:
        peft_model = apply_lora(base_model(), LoraConfig(rank=4, target_modules=["q_proj", "up_proj"] if seed == 1
                                                         else ["v_proj", "o_proj", "gate_proj"]))
        randomize_adapters(peft_model, seed)
        folders[name] = save_adapter(peft_model, tmp_path / name)

    tok = train_tokenizer(["ab ab abc", "hello world", "abc def 123"], TokenizerConfig(vocab_size=VOCAB, min_frequency=1))
    base = base_model()
    weights_before = snapshot(base)
    pilot = Autopilot(base, tok)
    prompt, opts = "ab", dict(max_tokens=12, temperature=0)
    plain = pilot.generate(prompt, **opts)
    plain_logits = logits(pilot.model, X)

    pilot.add_adapter("math", folders["math"])
    pilot.add_adapter("code", folders["code"])
    assert pilot.adapters() == ["math", "code"] and pilot.active is None
    assert torch.equal(logits(pilot.model, X), plain_logits)  # adding does not activate

    outputs = {}
    for name in ("math", "code"):
        pilot.use(name)
        outputs[name] = (pilot.generate(prompt, **opts), logits(pilot.model, X))
    assert outputs["math"][0] != outputs["code"][0]
    assert not torch.allclose(outputs["math"][1], outputs["code"][1], atol=1e-3)
    assert not torch.allclose(outputs["math"][1], plain_logits, atol=1e-3)

    pilot.use("math")
    assert pilot.generate(prompt, **opts) == outputs["math"][0]
    assert torch.equal(logits(pilot.model, X), outputs["math"][1])
    pilot.use(None)
    assert pilot.generate(prompt, **opts) == plain and torch.equal(logits(pilot.model, X), plain_logits)

    assert pilot.model is base  # never reloaded or copied
    after = snapshot(base)
    assert all(torch.equal(after[k], weights_before[k]) for k in weights_before)
    with pytest.raises(LatheError, match="no adapter named 'poetry'"):
        pilot.use("poetry")
    with pytest.raises(LatheError, match="already taken"):
        pilot.add_adapter("math", folders["math"])

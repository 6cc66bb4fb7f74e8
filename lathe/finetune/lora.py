"""LoRA adapters on lathe's GPT, through `peft`.

    peft_model = apply_lora(model, LoraConfig(rank=8, alpha=16))  # base frozen, adapters trainable
    train(peft_model, ...)                                        # the shared loop, unchanged
    save_adapter(peft_model, "adapters/math")                     # adapter weights + config only
    peft_model = load_adapter(base_model, "adapters/math")
    merged = merge_adapter(peft_model)                            # a plain GPT, W + (alpha/r) * B @ A

peft wraps any torch module whose target layers are nn.Linear, so it fits lathe's GPT as is: the
returned `PeftModel` forwards every call (`model(x, targets=y, loss_mask=m)`, `hidden_states`,
`lm_head`, `cfg`, `make_cache`) to the GPT, whose q/k/v/o (or any chosen) linears now carry LoRA
branches. An adapter folder is peft's own format (adapter_config.json + adapter_model.safetensors),
so `peft.PeftModel.from_pretrained(gpt, folder)` reads it too, plus `lathe_base.json`: the base
model's config, checked when the adapter is loaded onto a base.

A LoRA on `lm_head` of a model with tied embeddings is refused: merging it would also change the
input embedding that shares the same matrix.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from lathe.config import Section
from lathe.errors import LatheError
from lathe.io import atomic_path

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BASE_CONFIG = "lathe_base.json"
# Fields that decide tensor shapes: an adapter fits any base that agrees on these.
SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp", "mlp_hidden", "bias")


class LoraConfig(Section):
    rank: int = Field(8, ge=1, description="inner dimension r of the low-rank update B @ A")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
                                      description="name suffixes of the linear layers to adapt")


def to_peft_config(cfg: LoraConfig):
    import peft

    return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=list(cfg.target_modules), bias="none")


def check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every suffix must match at least one nn.Linear and nothing else (peft's matching rule)."""
    linears = [n for n, m in model.named_modules() if is_linear(m)]
    tied = tied_parameters(model)
    for target in targets:
        matched = [(n, m) for n, m in model.named_modules() if n == target or n.endswith("." + target)]
        if not matched:
            names = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise LatheError(f"lora.target_modules: '{target}' matches no layer (linear layers: {', '.join(names)})")
        for name, module in matched:
            if not is_linear(module):
                raise LatheError(f"lora.target_modules: '{target}' matches '{name}', a {type(module).__name__}, "
                                 f"not a linear layer")
            if id(module.weight) in tied:
                raise LatheError(f"lora.target_modules: '{name}' shares its weight with another layer (tied "
                                 f"embeddings); merging would change both: adapt other layers")


def is_linear(module: torch.nn.Module) -> bool:
    """An nn.Linear, or one that already carries another adapter's LoRA branch."""
    return isinstance(module, torch.nn.Linear) or isinstance(getattr(module, "base_layer", None), torch.nn.Linear)


def tied_parameters(model: torch.nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (lm_head tied to the embedding)."""
    seen, tied = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return tied


def apply_lora(model, cfg: LoraConfig, adapter_name: str = "default"):
    """Freeze `model` (a GPT) and add fresh LoRA adapters (B = 0: outputs unchanged until trained).
    Returns the peft model; the GPT is modified in place (its target linears gain LoRA branches)."""
    import peft

    if is_lora_model(model):
        raise LatheError("this model already has LoRA adapters: load more with load_adapter")
    check_targets(model, cfg.target_modules)
    model.requires_grad_(False)
    return peft.get_peft_model(model, to_peft_config(cfg), adapter_name=adapter_name)


def is_lora_model(model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def adapter_parameters(model) -> dict[str, torch.Tensor]:
    """name -> tensor of every LoRA weight (all adapters) of a peft model."""
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def save_adapter(model, folder: str | Path, adapter_name: str | None = None) -> Path:
    """Write one adapter (the active one by default) to `folder`, atomically: a few MB, not the base."""
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise LatheError(f"no adapter named '{name}' (have: {', '.join(model.peft_config)})")
    state = get_peft_model_state_dict(model, adapter_name=name)  # this adapter's LoRA weights only
    weights = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file(weights, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        model.peft_config[name].save_pretrained(str(tmp))
        if hasattr(model, "cfg"):  # a lathe GPT underneath: record its shapes for check_base
            (tmp / BASE_CONFIG).write_text(json.dumps(model.cfg.model_dump(), indent=2) + "\n", encoding="utf-8")
    return folder


def read_adapter_config(folder: str | Path):
    import peft

    folder = Path(folder)
    for needed in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / needed).is_file():
            raise LatheError(f"{folder / needed} does not exist: not an adapter folder (see save_adapter)")
    try:
        config = peft.PeftConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise LatheError(f"{folder / ADAPTER_CONFIG}: not a valid adapter config ({e})") from None
    if not isinstance(config, peft.LoraConfig):
        raise LatheError(f"{folder / ADAPTER_CONFIG}: field 'peft_type' is {config.peft_type}, "
                         f"lathe loads LORA adapters")
    return config


def check_base(base_cfg, folder: Path) -> None:
    """The adapter was trained on a base of the same shapes (weights are the user's responsibility)."""
    path = folder / BASE_CONFIG
    if base_cfg is None or not path.is_file():
        return  # an adapter made by peft directly: shapes are checked when its weights load
    saved = json.loads(path.read_text(encoding="utf-8"))
    for field in SHAPE_FIELDS:
        if saved.get(field) != getattr(base_cfg, field):
            raise LatheError(f"{folder}: adapter was made for a base with {field}={saved.get(field)}, "
                             f"this base has {field}={getattr(base_cfg, field)}")


def load_adapter(model, folder: str | Path, adapter_name: str = "default", trainable: bool = False):
    """Load an adapter onto `model` (a GPT, or a peft model that already holds other adapters) and
    make it the active one. Returns the peft model. The base weights stay frozen; on failure the
    model is left as it was."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    check_base(getattr(model, "cfg", None), folder)
    config.inference_mode = not trainable
    peft_model = _add_lora_layers(model, config, adapter_name)
    try:
        _load_adapter_weights(peft_model, folder, adapter_name)
    except LatheError:
        if peft_model is model:  # added beside other adapters: drop just this one
            model.delete_adapter(adapter_name)
        else:  # wrapped a plain GPT: take the LoRA layers out again
            peft_model.unload()
        raise
    peft_model.set_adapter(adapter_name, inference_mode=not trainable)
    return peft_model


def _add_lora_layers(model, config, adapter_name: str):
    """Empty LoRA layers for one more adapter: beside the others, or wrapping a plain GPT."""
    import peft

    if isinstance(model, peft.PeftModel):
        if adapter_name in model.peft_config:
            raise LatheError(f"an adapter named '{adapter_name}' is already loaded")
        check_targets(model.get_base_model(), sorted(config.target_modules))
        model.add_adapter(adapter_name, config)
        return model
    if is_lora_model(model):
        raise LatheError("this GPT already carries LoRA layers: pass its peft model instead")
    check_targets(model, sorted(config.target_modules))
    model.requires_grad_(False)
    return peft.get_peft_model(model, config, adapter_name=adapter_name)


def _load_adapter_weights(model, folder: Path, adapter_name: str) -> None:
    from peft import set_peft_model_state_dict

    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    try:
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    except RuntimeError as e:  # shape mismatch: an adapter for another base
        raise LatheError(f"{folder / ADAPTER_WEIGHTS}: weights do not fit the base "
                         f"({str(e).splitlines()[-1].strip()})") from None
    missing = [k for k in result.missing_keys if ".lora_" in k and f".{adapter_name}." in k]
    if missing or result.unexpected_keys:
        raise LatheError(f"{folder / ADAPTER_WEIGHTS}: weights do not fit the base "
                         f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")


def merge_adapter(model, in_place: bool = False):
    """A plain lathe GPT with the active adapter folded into its weights (all parameters trainable).
    By default the peft model is left as it was; in_place=True saves the copy's memory but consumes it."""
    work = model if in_place else copy.deepcopy(model)
    merged = work.merge_and_unload()
    return merged.requires_grad_(True)

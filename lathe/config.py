"""Recipes: YAML files validated by typed models. A typo or an out-of-range value names the field.

A recipe has one section per stage. `load_recipe` reads a YAML file (or a built-in recipe by name),
applies `section.field=value` overrides from the command line, and validates the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lathe.errors import LatheError

RECIPES_DIR = Path(__file__).parent / "recipes"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    sources: list[str] = Field(default_factory=list, description="files, folders or globs; empty = Python stdlib sources")
    extensions: list[str] = [".txt", ".md", ".py", ".jsonl"]
    text_field: str = "text"  # the field holding the text in .jsonl files
    min_chars: int = Field(32, ge=0)
    max_chars: int = Field(100_000, gt=0)
    max_total_bytes: Optional[int] = Field(None, gt=0, description="stop collecting after this many bytes")
    val_fraction: float = Field(0.05, ge=0, lt=1)
    test_fraction: float = Field(0.05, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self):
        if self.min_chars >= self.max_chars:
            raise ValueError("min_chars must be smaller than max_chars")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class TokenizerConfig(Section):
    vocab_size: int = Field(4096, ge=300, le=1 << 20)
    min_frequency: int = Field(2, ge=1)
    split_digits: bool = True
    max_train_bytes: Optional[int] = Field(None, gt=0, description="train BPE on at most this much text")


class ModelConfig(Section):
    vocab_size: Optional[int] = Field(None, gt=0, description="None: taken from the tokenizer")
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_head: Optional[int] = Field(None, ge=1, description="grouped-query attention; None = n_head")
    n_embd: int = Field(128, ge=8)
    block_size: int = Field(256, ge=8)
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    mlp_hidden: Optional[int] = Field(None, ge=1, description="None: 4*n_embd for gelu, ~8/3*n_embd for swiglu")
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    pos_emb: Literal["rope", "learned"] = "rope"
    bias: bool = False
    tie_embeddings: bool = True
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self):
        kv = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % kv:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({kv})")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rope needs an even head dimension")
        return self


class TrainConfig(Section):
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch per process")
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(500, ge=1)
    max_time_s: Optional[float] = Field(None, gt=0, description="stop early once this wall time is spent")
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(30, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    wsd_decay_fraction: float = Field(0.2, gt=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    eval_every: int = Field(100, ge=1)
    eval_tokens: int = Field(32768, ge=1, description="validation tokens per evaluation")
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    early_stop_patience: Optional[int] = Field(None, ge=1, description="evaluations without improvement")
    log_every: int = Field(10, ge=1)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False


class EvalConfig(Section):
    max_tokens: int = Field(65536, ge=1, description="tokens of the test split to score")


class GenerateConfig(Section):
    prompt: str = "def "
    num_samples: int = Field(3, ge=1)
    max_tokens: int = Field(200, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_k: Optional[int] = Field(50, ge=1)
    top_p: Optional[float] = Field(0.95, gt=0, le=1)
    stop: list[str] = []
    seed: int = 0


class Recipe(Section):
    name: str = "default"
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    generate: GenerateConfig = GenerateConfig()


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown field (typo?)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  field '{field}': {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], object]:
    """'train.lr=1e-3' -> (['train', 'lr'], 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise LatheError(f"override '{text}' must look like section.field=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else ""


def load_recipe(recipe: str | Path | None = None, overrides: list[str] | dict | None = None) -> Recipe:
    """Load a recipe file or a built-in recipe name ('default', 'tiny'), apply overrides, validate."""
    source = "built-in defaults"
    raw: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.exists() and (RECIPES_DIR / f"{recipe}.yaml").exists():
            path = RECIPES_DIR / f"{recipe}.yaml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
            raise LatheError(f"recipe '{recipe}' not found (a YAML path, or one of: {known})")
        source = str(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise LatheError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise LatheError(f"{path}: a recipe must be a mapping of sections")
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for keys, value in items:
        keys = keys.split(".") if isinstance(keys, str) else keys
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise LatheError(f"override {'.'.join(keys)}: '{k}' is not a section")
        node[keys[-1]] = value
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise LatheError(format_validation_error(e, source)) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)

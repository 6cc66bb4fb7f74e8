"""The improve loop's settings: one YAML file (lathe/recipes/improve.yaml), validated like a recipe.

It reuses the recipe's sections for the model, the tokenizer and training (`train` for round 0,
`retrain` for every later round) and adds the loop's own: the task, proposing, verifying, gating.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import Field, ValidationError, model_validator

from lathe.config import (ModelConfig, Section, TokenizerConfig, TrainConfig,
                          apply_overrides, format_validation_error, read_recipe_file)
from lathe.errors import LatheError


class SeedSet(Section):
    size: int = Field(1000, ge=1)
    options: Optional[dict] = Field(None, description="generator options of this draw (None: the task's), "
                                                      "e.g. easier tasks than the loop must learn")


class TaskConfig(Section):
    kind: Literal["addition", "sorting", "reversal"] = "addition"
    options: dict = Field(default_factory=dict, description="generator options of held-out and proposed tasks")
    seed_sets: list[SeedSet] = Field(default_factory=lambda: [SeedSet()], min_length=1,
                                     description="the originals the base model learns from: one or more draws")
    heldout_size: int = Field(500, ge=10, description="held-out prompts every model is scored on")
    seed: int = 0
    answer_order: Literal["natural", "reversed"] = Field(
        "natural", description="addition only: the model writes the sum's digits least significant first, "
                               "as people add; stored data and the verifier keep the natural order")

    @model_validator(mode="after")
    def _check(self):
        if self.answer_order == "reversed" and self.kind != "addition":
            raise ValueError("answer_order 'reversed' is for addition only")
        return self


class ProposeConfig(Section):
    prompts_per_round: int = Field(2000, ge=1)
    samples_per_prompt: int = Field(4, ge=1, description="k candidates per prompt, sharing one prefill")
    temperature: float = Field(1.0, ge=0)
    top_k: Optional[int] = Field(None, ge=1)
    max_answer_tokens: int = Field(12, ge=1)
    rework_fraction: float = Field(0.0, ge=0, le=1, description="share of prompts taken from the originals")
    father_url: Optional[str] = Field(None, description="OpenAI-compatible endpoint of a stronger proposer")
    father_model: Optional[str] = None
    father_api_key_env: str = "OPENAI_API_KEY"
    father_new_tasks: int = Field(0, ge=0, description="new tasks the father writes per round")
    self_new_tasks: int = Field(0, ge=0, description="new tasks the champion itself writes per round (sampled "
                                                     "from <|bos|> up to the prompt's closing '=')")


class VerifyConfig(Section):
    verifier: Optional[str] = Field(None, description="None: the task's own checker; 'none': keep every sample")
    filters: list[str] = ["degenerate", "dedup"]
    drop_mastered: bool = Field(False, description="drop the samples of prompts whose k samples all passed: the "
                                                   "champion already masters them; keep the frontier")


class GateConfig(Section):
    margin_sigma: float = Field(2.0, ge=0, description="promote only when gain > margin_sigma x noise")
    min_gain: float = Field(0.0, ge=0, description="and the accuracy gain is above this")
    bootstrap: int = Field(1000, ge=10, description="resamples of the held-out items for the noise estimate")
    noise_runs: int = Field(1, ge=1, description="base models trained with different seeds to measure run-to-run spread")
    collapse_ppl_ratio: float = Field(2.0, gt=1, description="stop when held-out perplexity exceeds base x this")


class TuneConfig(Section):
    trials: list[str] = Field(default_factory=lambda: ["lr*2", "lr/2", "width*2", "depth+1", "schedule=wsd",
                                                       "rework_share=0.5"])
    seeds: int = Field(2, ge=1, description="runs of the current recipe that measure run-to-run spread")


# Tiny algorithmic tasks on a CPU: a small model, and a strong weight decay, which makes such models
# generalize (rather than memorize) several times sooner and from one seed to the next far more alike.
TRAIN = dict(batch_size=64, lr=6e-3, weight_decay=1.0, warmup_steps=30, log_every=50, keep_checkpoints=1)


class ImproveConfig(Section):
    name: str = "improve"
    task: TaskConfig = TaskConfig()
    # bytes only: digits are split anyway, and reversing or sorting letters needs one token per letter
    tokenizer: TokenizerConfig = TokenizerConfig(vocab_size=269)
    model: ModelConfig = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32)
    train: TrainConfig = TrainConfig(**TRAIN, max_steps=1000, eval_every=250, checkpoint_every=200)
    retrain: TrainConfig = TrainConfig(**TRAIN, max_steps=600, eval_every=600, checkpoint_every=100)
    retrain_from: Literal["champion", "base", "scratch"] = "champion"
    rework_share: Optional[float] = Field(None, ge=0, le=1, description="share of each batch from rework rounds; None: by count")
    propose: ProposeConfig = ProposeConfig()
    verify: VerifyConfig = VerifyConfig()
    gate: GateConfig = GateConfig()
    tune: TuneConfig = TuneConfig()
    rounds: int = Field(5, ge=0)
    target_accuracy: Optional[float] = Field(None, gt=0, le=1, description="stop once the champion reaches this")
    controls: bool = Field(True, description="also run the no-loop and keep-all arms for comparison")
    threads: Optional[int] = Field(1, ge=1, description="torch CPU threads per process; tiny models run best on one")
    workers: Optional[int] = Field(None, ge=1, description="processes running the arms (loop, controls) side by "
                                                           "side; None: one per CPU core, at most one per arm")

    @model_validator(mode="after")
    def _check(self):
        if (self.propose.father_url is None) != (self.propose.father_model is None):
            raise ValueError("propose.father_url and propose.father_model go together")
        return self


def load_improve_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ImproveConfig:
    """A YAML file or a built-in name ('improve', 'improve-tiny') over the defaults of ImproveConfig (None:
    the defaults alone), then section.field=value overrides."""
    if path is None:
        return _validate({}, overrides, "the defaults")
    raw, source = read_recipe_file(path, "improve config", "improve*.yaml")
    return _validate(raw, overrides, source)


def _validate(raw: dict, overrides: list[str] | None, source: str) -> ImproveConfig:
    apply_overrides(raw, overrides)
    try:
        return ImproveConfig.model_validate(merge(ImproveConfig().model_dump(), raw))
    except ValidationError as e:
        raise LatheError(format_validation_error(e, source)) from None


def merge(base: dict, update: dict) -> dict:
    """`update` over `base`, section by section: a file that sets train.max_steps keeps the other train defaults."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def dump_config(cfg: ImproveConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

"""Reward model: the GPT with a scalar head, trained on preference pairs with the Bradley-Terry loss.

    r = head(hidden state of the response's last token)
    loss = -log sigmoid(r_chosen - r_rejected)

The last token is the response's end token (<|eos|> or <|assistant_end|>), so the reward reads a
state that has seen the whole prompt and response. Quality is the pairwise accuracy on held-out
pairs: how often r_chosen > r_rejected.

The reward model is a GPT subclass, so it saves and loads with the ordinary checkpoint code; its
state.json says `"kind": "reward_model"`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lathe.align.pairs import (PreferencePair, encode_prompt, encode_response, fit_length, fixed_batches, pair_batches,
                               score_batch, unprefixed)
from lathe.config import ModelConfig, TrainConfig
from lathe.errors import LatheError
from lathe.model import GPT
from lathe.train.checkpoint import load_state, load_weights, resolve_checkpoint
from lathe.train.loop import train

KIND = "reward_model"


class RewardModel(GPT):
    """A GPT whose forward returns one scalar per sequence, read at position `last` of each row."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.reward_head = nn.Linear(cfg.n_embd, 1)
        nn.init.normal_(self.reward_head.weight, std=0.02)
        nn.init.zeros_(self.reward_head.bias)
        self.lm_head.requires_grad_(cfg.tie_embeddings)  # untied, the LM head is unused: do not train it

    @classmethod
    def from_base(cls, base: GPT) -> "RewardModel":
        """A reward model whose transformer starts as a copy of `base` (the head starts near zero)."""
        model = cls(base.cfg).to(base.lm_head.weight.device)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        if set(missing) != {"reward_head.weight", "reward_head.bias"} or unexpected:
            raise LatheError(f"base model does not fit a reward model (missing {missing}, unexpected {unexpected})")
        return model

    def forward(self, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = self.hidden_states(idx)
        return self.reward_head(h[torch.arange(idx.size(0), device=idx.device), last]).squeeze(-1).float()


def bradley_terry_loss(model, batch) -> torch.Tensor:
    """batch = (ids, last) with the chosen rows first, then their rejected partners."""
    x, last = batch
    r = model(x, last)
    half = r.size(0) // 2
    return -F.logsigmoid(r[:half] - r[half:]).mean()


@torch.no_grad()
def pairwise_metrics(model: RewardModel, pairs: Sequence[PreferencePair], pad_id: int, batch_size: int = 64) -> dict:
    """Bradley-Terry loss, pairwise accuracy (r_chosen > r_rejected, ties count as wrong), mean margin."""
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    margins = []
    for x, last in fixed_batches(pairs, batch_size, score_batch, pad_id):
        r = model(x.to(device), last.to(device))
        half = r.size(0) // 2
        margins.append(r[:half] - r[half:])
    model.train(was_training)
    m = torch.cat(margins)
    return {"loss": -F.logsigmoid(m).mean().item(), "accuracy": (m > 0).float().mean().item(),
            "margin": m.mean().item(), "pairs": len(pairs)}


def train_reward_model(base: GPT, tokenizer, train_pairs: Sequence[PreferencePair],
                       val_pairs: Sequence[PreferencePair], cfg: TrainConfig, out_dir: Path,
                       resume: bool = False) -> tuple[RewardModel, dict]:
    """Train a reward model from `base` with the shared training loop; returns it and a summary with
    held-out metrics before and after training."""
    pad_id = tokenizer.pad_id
    model = RewardModel.from_base(base)
    before = pairwise_metrics(model, val_pairs, pad_id)
    get_batch = pair_batches(train_pairs, cfg.batch_size, cfg.seed, score_batch, pad_id)

    def evaluate(m):
        return {f"val_{k}": v for k, v in pairwise_metrics(m, val_pairs, pad_id).items()}

    result = train(model, cfg, get_batch, evaluate, Path(out_dir), resume=resume, loss_fn=bradley_terry_loss,
                   stage="reward", extra_state={"kind": KIND})
    after = unprefixed(result.last_eval, "val_") or pairwise_metrics(model, val_pairs, pad_id)
    return model, {"before": before, "after": after, "steps": result.step, "stopped": result.stopped,
                   "train_pairs": len(train_pairs), "params": result.params}


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    """A reward model from a run dir, checkpoints dir or checkpoint dir written by train_reward_model."""
    ckpt = resolve_checkpoint(path)
    state = load_state(ckpt)
    if state.get("kind") != KIND:
        raise LatheError(f"{ckpt} is not a reward model checkpoint (train one with `lathe align reward`)")
    model = RewardModel(ModelConfig.model_validate(state["model"]))
    load_weights(model, ckpt)
    return model.to(device).eval()


def reward_from_model(model: RewardModel, tokenizer):
    """The reward model as an RL reward: `(prompt, completion) -> float`, scored like a training pair."""
    device = model.lm_head.weight.device
    max_len = model.cfg.block_size

    @torch.no_grad()
    def score(prompt, completion: str) -> float:
        prompt_ids, (response_ids,) = fit_length(encode_prompt(tokenizer, prompt),
                                                 [encode_response(tokenizer, prompt, completion)], max_len)
        ids = prompt_ids + response_ids
        x = torch.tensor([ids], device=device)
        return model(x, torch.tensor([len(ids) - 1], device=device)).item()

    score.raw_prompt = True  # score chats as chats, the way the pairs were rendered in training
    return score


# --- the stage ---------------------------------------------------------------------------------------
REWARD_DEFAULTS = {"max_steps": 200, "lr": 3e-4, "warmup_steps": 10, "batch_size": 16, "weight_decay": 0.0,
                   "eval_every": 50, "checkpoint_every": 50, "log_every": 10}


def run_reward(base, data: Sequence[str | Path], out=None, name=None, overrides=(), val_data=None,
               val_fraction: float = 0.1, resume: bool = False) -> dict:
    """`lathe align reward`: train a reward model on a base run's model; writes <out>/reward_report.{md,json}."""
    from lathe.align.pairs import load_preference_data, open_stage
    from lathe.console import info
    from lathe.finetune.sft import markdown_table, write_stage_report

    stage = open_stage(base, out, name, "reward", REWARD_DEFAULTS, overrides)
    base_model = stage.load_model()
    train_pairs, val_pairs = load_preference_data(stage.tokenizer, data, val_data, val_fraction, stage.train.seed,
                                                  base_model.cfg.block_size)
    _, summary = train_reward_model(base_model, stage.tokenizer, train_pairs, val_pairs, stage.train, stage.out,
                                    resume)
    summary.update(base=str(stage.base.path), data=[str(d) for d in data])
    b, a = summary["before"], summary["after"]
    rows = [[m, b[m], a[m]] for m in ("accuracy", "loss", "margin")]
    write_stage_report(stage.out, "reward", "Reward model", summary, [
        "## Held-out pairs", "", f"{a['pairs']} held-out pairs, {summary['train_pairs']} training pairs, "
        f"{summary['steps']} steps ({summary['stopped']}).", "",
        *markdown_table(["metric", "before", "after"], rows)])
    info(f"reward model: held-out pairwise accuracy {b['accuracy']:.1%} -> {a['accuracy']:.1%} ({a['pairs']} pairs)")
    return summary

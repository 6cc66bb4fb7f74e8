"""Direct Preference Optimization (Rafailov et al., 2023): learn from preference pairs without a reward
model, against a frozen copy of the starting policy.

    implicit reward  r(y) = beta * (log pi(y|x) - log pi_ref(y|x))      (response tokens only)
    loss             -log sigmoid(r(chosen) - r(rejected))

beta sets how far the policy may move from the reference: small beta lets it go far (at the
objective's optimum; with a fixed number of Adam steps the lr matters as much). Reported on held-out
pairs: preference accuracy (r(chosen) > r(rejected)), the implicit rewards and their margin, and the
KL from the policy to the reference, per token over the held-out responses and per reply sampled
from the policy (see preference_metrics).

Plain DPO only widens the margin, and may lower the chosen replies' likelihood as well, moving
probability to replies that neither side contains (on the tests' toy task: empty replies). An
optional NLL term on the chosen replies (`sft_weight`) counters that.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from lathe.align.pairs import PreferencePair, fixed_batches, lm_batch, pair_batches, sample_ids, stop_ids, unprefixed
from lathe.config import TrainConfig
from lathe.errors import LatheError
from lathe.model import GPT
from lathe.train.loop import train


def logprobs_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-position log-probabilities of the targets y (B, T); 0 where y == -100."""
    return -F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-100, reduction="none")


def token_logprobs(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits, _ = model(x)
    return logprobs_of(logits, y)


def sequence_logprobs(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log pi(response | prompt) per row: the sum over the response tokens (y != -100)."""
    return token_logprobs(model, x, y).sum(-1)


def frozen_copy(model: GPT) -> GPT:
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair DPO loss and the implicit rewards of the chosen and rejected responses."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


class DPOLoss:
    """loss_fn for the training loop: batch = (x, y), chosen rows first, then their rejected partners.

    sft_weight > 0 adds that much of the chosen responses' per-token negative log-likelihood (the
    "DPO + NLL" of RPO / Llama 3): plain DPO only cares about the margin and can lower the chosen
    responses' likelihood too, moving probability to replies neither side contains (an empty one)."""

    def __init__(self, reference: GPT, beta: float, sft_weight: float = 0.0):
        self.reference, self.beta, self.sft_weight = reference, beta, sft_weight

    def __call__(self, model, batch) -> torch.Tensor:
        x, y = batch
        self.reference.to(x.device)  # the loop places the policy; the reference follows it
        policy = sequence_logprobs(model, x, y)
        with torch.no_grad():
            ref = sequence_logprobs(self.reference, x, y)
        half = x.size(0) // 2
        loss, _, _ = dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], self.beta)
        if not self.sft_weight:
            return loss.mean()
        chosen_tokens = (y[:half] != -100).sum(-1).clamp(min=1)
        return loss.mean() - self.sft_weight * (policy[:half] / chosen_tokens).mean()


@torch.no_grad()
def preference_metrics(policy: GPT, reference: GPT, pairs: Sequence[PreferencePair], beta: float, tokenizer,
                       batch_size: int = 32, kl_samples: int = 64, seed: int = 0) -> dict:
    """Held-out DPO loss, preference accuracy, implicit rewards and margin, and two KLs to the reference:

    kl_per_token  exact KL(policy || reference) of the next-token distributions, averaged over the
                  positions of the held-out responses (chosen and rejected: teacher-forced);
    kl_sampled    KL(policy || reference) of whole responses, estimated from one policy sample for each
                  of the first `kl_samples` held-out prompts (temperature 1, fixed seeds): the quantity
                  the RLHF objective that DPO solves keeps small."""
    was_training = policy.training
    policy.eval()
    device = policy.lm_head.weight.device
    reference.to(device)
    losses, chosen, rejected, kl_sum, kl_tokens = [], [], [], 0.0, 0
    for x, y in fixed_batches(pairs, batch_size, lm_batch, tokenizer.pad_id):
        x, y = x.to(device), y.to(device)
        logits_p, logits_q = policy(x)[0].float(), reference(x)[0].float()
        lp, lq = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
        seq_p, seq_q = logprobs_of(logits_p, y).sum(-1), logprobs_of(logits_q, y).sum(-1)
        half = x.size(0) // 2
        loss, c, r = dpo_loss(seq_p[:half], seq_p[half:], seq_q[:half], seq_q[half:], beta)
        losses.append(loss)
        chosen.append(c)
        rejected.append(r)
        mask = y != -100
        kl_sum += ((lp.exp() * (lp - lq)).sum(-1) * mask).sum().item()
        kl_tokens += int(mask.sum())
    kl_sampled = sampled_kl(policy, reference, [p.prompt_ids for p in pairs[:kl_samples]], tokenizer,
                            max(len(p.chosen_ids) for p in pairs), seed)
    policy.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"loss": torch.cat(losses).mean().item(), "accuracy": (c > r).float().mean().item(),
            "reward_margin": (c - r).mean().item(), "chosen_reward": c.mean().item(),
            "rejected_reward": r.mean().item(), "kl_per_token": kl_sum / max(1, kl_tokens),
            "kl_sampled": kl_sampled, "pairs": len(pairs)}


@torch.no_grad()
def sampled_kl(policy: GPT, reference: GPT, prompts: Sequence[list[int]], tokenizer, max_tokens: int,
               seed: int = 0) -> float:
    """Monte Carlo KL(policy || reference) per response: mean over y ~ policy of log pi(y) - log pi_ref(y)."""
    device = policy.lm_head.weight.device
    stops = stop_ids(tokenizer)
    max_tokens = max(1, min(max_tokens, policy.cfg.block_size - max(len(p) for p in prompts)))
    rows = [(p, sample_ids(policy, p, 1, max_tokens, 1.0, seed + n, stops)[0]) for n, p in enumerate(prompts)]
    x, y = (t.to(device) for t in lm_batch(rows, tokenizer.pad_id))
    return (sequence_logprobs(policy, x, y) - sequence_logprobs(reference, x, y)).mean().item()


def train_dpo(policy: GPT, tokenizer, train_pairs: Sequence[PreferencePair], val_pairs: Sequence[PreferencePair],
              cfg: TrainConfig, out_dir: Path, beta: float, sft_weight: float = 0.0, reference: GPT | None = None,
              resume: bool = False) -> dict:
    """DPO-train `policy` (the starting model) in place with the shared loop; the reference is a frozen
    copy of it as given (with resume, the loop then loads the latest checkpoint into the policy).
    Returns held-out metrics before and after."""
    reference = reference if reference is not None else frozen_copy(policy)
    before = preference_metrics(policy, reference, val_pairs, beta, tokenizer, seed=cfg.seed)
    get_batch = pair_batches(train_pairs, cfg.batch_size, cfg.seed, lm_batch, tokenizer.pad_id)

    def evaluate(m):
        metrics = preference_metrics(m, reference, val_pairs, beta, tokenizer, seed=cfg.seed)
        return {f"val_{k}": v for k, v in metrics.items()}

    result = train(policy, cfg, get_batch, evaluate, Path(out_dir), resume=resume,
                   loss_fn=DPOLoss(reference, beta, sft_weight), stage="dpo",
                   extra_state={"kind": "policy", "beta": beta, "sft_weight": sft_weight})
    after = unprefixed(result.last_eval, "val_") or preference_metrics(policy, reference, val_pairs, beta, tokenizer,
                                                                      seed=cfg.seed)
    return {"before": before, "after": after, "beta": beta, "sft_weight": sft_weight, "steps": result.step,
            "stopped": result.stopped, "train_pairs": len(train_pairs), "params": result.params}


# --- the stage ---------------------------------------------------------------------------------------
DPO_DEFAULTS = {"max_steps": 200, "lr": 1e-4, "warmup_steps": 10, "batch_size": 8, "weight_decay": 0.0,
                "eval_every": 50, "checkpoint_every": 50, "log_every": 10}


def run_dpo(base, data: Sequence[str | Path], beta: float = 0.1, out=None, name=None, overrides=(), val_data=None,
            val_fraction: float = 0.1, sft_weight: float = 0.0, resume: bool = False) -> dict:
    """`lathe align dpo`: DPO a base run's model on preference pairs; writes <out>/dpo_report.{md,json}."""
    from lathe.align.pairs import load_preference_data, open_stage
    from lathe.console import info
    from lathe.finetune.sft import markdown_table, write_stage_report

    if beta <= 0:
        raise LatheError(f"--beta must be positive, got {beta}")
    if sft_weight < 0:
        raise LatheError(f"--sft-weight must be 0 or more, got {sft_weight}")
    stage = open_stage(base, out, name, "dpo", DPO_DEFAULTS, overrides)
    policy = stage.load_model()
    train_pairs, val_pairs = load_preference_data(stage.tokenizer, data, val_data, val_fraction, stage.train.seed,
                                                  policy.cfg.block_size + 1)
    summary = train_dpo(policy, stage.tokenizer, train_pairs, val_pairs, stage.train, stage.out, beta, sft_weight,
                        resume=resume)
    summary.update(base=str(stage.base.path), data=[str(d) for d in data])
    b, a = summary["before"], summary["after"]
    rows = [[m, b[m], a[m]] for m in ("accuracy", "reward_margin", "chosen_reward", "rejected_reward",
                                      "kl_per_token", "kl_sampled", "loss")]
    write_stage_report(stage.out, "dpo", "DPO", summary, [
        "## Held-out pairs", "", f"beta {beta}, sft_weight {sft_weight}; {a['pairs']} held-out pairs, "
        f"{summary['train_pairs']} training pairs, {summary['steps']} steps ({summary['stopped']}). "
        "Rewards are DPO's implicit rewards "
        "beta * (log pi - log pi_ref) of the whole response. kl_per_token: KL(policy || reference) of the "
        "next-token distributions over the held-out responses; kl_sampled: KL of whole responses sampled from "
        "the policy (nats per response).", "",
        *markdown_table(["metric", "before", "after"], rows)])
    info(f"dpo: held-out preference accuracy {b['accuracy']:.1%} -> {a['accuracy']:.1%}, reward margin "
         f"{a['reward_margin']:.3f}, KL to the reference {a['kl_sampled']:.3f} nats/response "
         f"({a['kl_per_token']:.4f} nats/token on held-out responses)")
    return summary

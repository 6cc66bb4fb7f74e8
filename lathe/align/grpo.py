"""RL with verifiable rewards: GRPO (Shao et al., 2024) and its family.

One step:
  1. draw `prompts_per_step` prompts by (seed, step) and sample `group_size` completions of each from
     the current policy;
  2. score every completion with the rewards: plain callables `(prompt, completion) -> float` (or a
     lathe.verify Verdict), several combined with weights; each part is logged on its own;
  3. advantages are group-relative: (r - mean of the group) / (std of the group + eps). With
     `scale_by_std=False` the division is dropped (Dr. GRPO), which stops near-solved groups from
     being amplified;
  4. `inner_epochs` passes of the PPO clipped objective over the samples, their log-probs frozen at
     sampling time, plus an optional KL penalty to a frozen reference (the k3 estimator
     exp(q - p) - (q - p) - 1 per token, always >= 0). The loss is averaged over all completion
     tokens of a minibatch, so long completions are not down-weighted.
Every `eval_every` steps the held-out reward (greedy completions of held-out prompts by default) goes
to metrics.jsonl beside the training rows.

Why not `lathe.train.loop.train`: that loop takes one optimizer step per batch, and batch i must be a
pure function of i. Here the batch is sampled from the policy as it stands at that step, and each
sample batch serves several optimizer steps with log-probs fixed at sampling time. So this is a short
loop of its own made of the shared pieces (make_optimizer, lr_at, checkpoints with exact resume,
metrics.jsonl rows, the progress bar). It runs in one process; the dropout is off throughout, since
the probability ratio must compare one function with itself. Of TrainConfig it uses the optimizer and
schedule fields, max_steps, max_time_s, the eval/log/checkpoint cadence, seed, device and dtype; the
batch is prompts_per_step x group_size completions (batch_size, grad_accum, compile and early stopping
do not apply).
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from pydantic import Field

from lathe.align.dpo import frozen_copy, token_logprobs
from lathe.align.pairs import (Prompt, decode_response, encode_prompt, lm_batch, prompt_for, sample_ids, score_of,
                               stop_ids)
from lathe.config import Section, TrainConfig
from lathe.console import info, progress_bar
from lathe.errors import LatheError
from lathe.io import append_jsonl
from lathe.model import GPT
from lathe.train.checkpoint import latest_checkpoint, restore, save_checkpoint
from lathe.train.dist import autocast_context, pick_device
from lathe.train.loop import make_optimizer, set_lr, truncate_metrics
from lathe.train.schedule import lr_at


class GRPOConfig(Section):
    group_size: int = Field(8, ge=2, description="completions sampled per prompt")
    prompts_per_step: int = Field(8, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    top_k: Optional[int] = Field(None, ge=1)
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clipping")
    kl_coef: float = Field(0.0, ge=0, description="weight of the KL penalty to the starting policy; 0 = none")
    inner_epochs: int = Field(2, ge=1, description="optimization passes over each sampled batch")
    minibatches: int = Field(1, ge=1, description="optimizer steps per pass")
    scale_by_std: bool = True
    eval_temperature: float = Field(0.0, ge=0, description="held-out decoding; 0 = greedy")
    eval_samples: int = Field(1, ge=1, description="held-out completions per prompt (sampled, fixed seeds)")


# --- rewards and prompts ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RLPrompt:
    """A prompt and the keyword arguments its verifiers need (expected=..., tests=...; often none)."""
    prompt: Prompt
    ctx: dict = field(default_factory=dict)


def as_rl_prompt(item) -> RLPrompt:
    """A string, a chat-message list, a {"prompt": ..., **ctx} row, or a lathe.verify Task."""
    if isinstance(item, RLPrompt):
        return item
    if isinstance(item, dict):
        if "prompt" not in item:
            raise LatheError(f"RL prompt row {str(item)[:80]} has no 'prompt' field")
        return RLPrompt(item["prompt"], {k: v for k, v in item.items() if k != "prompt"})
    if isinstance(item, (str, list)):
        return RLPrompt(item)
    if hasattr(item, "prompt"):  # a lathe.verify Task: its verifier recomputes the answer from the prompt
        return RLPrompt(item.prompt)
    raise LatheError(f"not an RL prompt: {item!r}")


@dataclass
class Rewards:
    """Several rewards combined as lathe.verify.combine does (the weighted mean), keeping each part's
    score so it can be logged on its own. A part is a verifier `(prompt, answer, **ctx) -> Verdict`
    or any `(prompt, completion) -> float` (a reward model's score, say: not bound to [0, 1])."""
    parts: list[tuple[str, float, Callable]] = field(default_factory=list)

    def score(self, prompt: Prompt, completion: str, ctx: Mapping | None = None) -> dict[str, float]:
        """Each part's score. `ctx` (a prompt row's extra fields) goes to the parts that take **ctx."""
        scores = {}
        for name, _, fn in self.parts:
            seen = prompt_for(fn, prompt)
            scores[name] = score_of(fn(seen, completion, **ctx) if ctx and takes_ctx(fn) else fn(seen, completion))
        return scores

    def total(self, scores: Mapping[str, float]) -> float:
        weight = sum(w for _, w, _ in self.parts)
        return sum(w * scores[name] for name, w, _ in self.parts) / weight

    def __call__(self, prompt: Prompt, completion: str, **ctx) -> float:
        return self.total(self.score(prompt, completion, ctx))


@functools.lru_cache(maxsize=None)
def takes_ctx(fn: Callable) -> bool:
    """Whether fn accepts **ctx, as verifiers do; a plain (prompt, completion) callable does not."""
    try:
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: hand them nothing extra
        return False


def combine_rewards(rewards: Mapping[str, Callable] | Callable, weights: Mapping[str, float] | None = None) -> Rewards:
    """{name: fn} (or one fn) with optional {name: weight} (default 1) -> Rewards."""
    if isinstance(rewards, Rewards):
        return rewards
    if callable(rewards):
        rewards = {getattr(rewards, "__name__", "reward"): rewards}
    weights = dict(weights or {})
    unknown = set(weights) - set(rewards)
    if unknown:
        raise LatheError(f"weights given for unknown rewards: {', '.join(sorted(unknown))}")
    if not rewards or any(w < 0 for w in weights.values()) or sum(weights.get(n, 1.0) for n in rewards) <= 0:
        raise LatheError(f"rewards need non-negative weights with a positive sum, got {weights or 'none'}")
    return Rewards([(name, float(weights.get(name, 1.0)), fn) for name, fn in rewards.items()])


def parse_reward_spec(spec: str) -> dict[str, float]:
    """'addition,format:0.2' -> {'addition': 1.0, 'format': 0.2}."""
    weights = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, weight = item.partition(":")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise LatheError(f"reward '{item}': the weight after ':' must be a number") from None
    if not weights:
        raise LatheError("no reward named (e.g. --reward addition or --reward addition:1,python:0.5)")
    return weights


def rewards_from_spec(spec: str | None, extra: Mapping[str, Callable] | None = None) -> Rewards:
    """Verifiers from the lathe.verify registry by name, with weights ('addition,python:0.5'). `extra`
    adds named callables (a reward model, say), weight 1 unless the spec weights them too."""
    from lathe.verify import get_verifier  # an unknown name raises a LatheError listing the known ones

    extra = dict(extra or {})
    weights = parse_reward_spec(spec) if spec else {}
    if not weights and not extra:
        raise LatheError("no reward given: name verifiers (e.g. --reward addition) or a reward model")
    fns = {name: extra[name] if name in extra else get_verifier(name) for name in weights}
    for name, fn in extra.items():
        fns.setdefault(name, fn)
    return combine_rewards(fns, weights)


# --- the pieces of one step ------------------------------------------------------------------------
@dataclass
class Group:
    """One prompt's sampled completions and their scores."""
    prompt: RLPrompt
    prompt_ids: list[int]
    completions: list[list[int]]  # ids, ending with the stop token when one was produced
    scores: list[dict[str, float]]
    rewards: list[float]


def rollout_prompt_ids(tokenizer, prompt: Prompt, block_size: int, max_new_tokens: int) -> list[int]:
    """The prompt's ids, oldest tokens cut so max_new_tokens still fit in the context."""
    return encode_prompt(tokenizer, prompt)[-(block_size - max_new_tokens):]


def rollout(policy: GPT, tokenizer, prompts: Sequence[RLPrompt], seeds: Sequence[int], rewards: Rewards,
            rl: GRPOConfig) -> list[Group]:
    """group_size sampled completions of each prompt (one shared prefill per prompt), scored."""
    stops = stop_ids(tokenizer)
    groups = []
    for prompt, seed in zip(prompts, seeds):
        ids = rollout_prompt_ids(tokenizer, prompt.prompt, policy.cfg.block_size, rl.max_new_tokens)
        completions = sample_ids(policy, ids, rl.group_size, rl.max_new_tokens, rl.temperature, int(seed), stops,
                                 rl.top_k)
        scores = [rewards.score(prompt.prompt, decode_response(tokenizer, c), prompt.ctx) for c in completions]
        groups.append(Group(prompt, ids, completions, scores, [rewards.total(s) for s in scores]))
    return groups


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (groups, group_size) -> advantages relative to each group; a group of equal rewards
    gets zero advantage (it has nothing to teach)."""
    centered = rewards - rewards.mean(-1, keepdim=True)
    if not scale_by_std:
        return centered
    return centered / (rewards.std(-1, keepdim=True, correction=0) + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy; unbiased and >= 0."""
    d = ref_logp - logp
    return d.exp() - d - 1


def clipped_policy_loss(logp, old_logp, advantages, mask, clip_eps: float, ref_logp=None, kl_coef: float = 0.0):
    """PPO's clipped surrogate per token (advantages per row), plus kl_coef * k3; mean over masked tokens."""
    ratio = (logp - old_logp).exp()
    adv = advantages.unsqueeze(-1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_token = per_token + kl_coef * kl
    n = mask.sum().clamp(min=1)
    stats = {"clip_frac": (((ratio - 1).abs() > clip_eps) & mask).sum().item() / n.item(),
             "kl": ((kl * mask).sum() / n).item()}
    return (per_token * mask).sum() / n, stats


def policy_update(policy, reference, optimizer, groups: list[Group], rl: GRPOConfig, cfg: TrainConfig,
                  pad_id: int, autocast, generator: torch.Generator) -> dict:
    """inner_epochs x minibatches optimizer steps on one step's samples."""
    device = policy.lm_head.weight.device
    rows = [(g.prompt_ids, c) for g in groups for c in g.completions]
    advantages = group_advantages(torch.tensor([g.rewards for g in groups]), rl.scale_by_std).flatten().to(device)
    x, y = (t.to(device) for t in lm_batch(rows, pad_id))
    mask = y != -100
    with torch.no_grad(), autocast:
        old = token_logprobs(policy, x, y)
        ref = token_logprobs(reference, x, y) if reference is not None else None
    losses, clip_fracs, kls, grad_norm = [], [], [], 0.0
    for _ in range(rl.inner_epochs):
        for mb in torch.randperm(len(rows), generator=generator).to(device).chunk(rl.minibatches):
            with autocast:
                logp = token_logprobs(policy, x[mb], y[mb])
            loss, stats = clipped_policy_loss(logp, old[mb], advantages[mb], mask[mb], rl.clip_eps,
                                              ref[mb] if ref is not None else None, rl.kl_coef)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf")).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            clip_fracs.append(stats["clip_frac"])
            kls.append(stats["kl"])
    return {"loss": float(np.mean(losses)), "clip_frac": float(np.mean(clip_fracs)), "kl": float(np.mean(kls)),
            "grad_norm": grad_norm}


def step_stats(groups: list[Group]) -> dict:
    rewards = np.array([g.rewards for g in groups], dtype=np.float64)
    parts = {name: float(np.mean([s[name] for g in groups for s in g.scores])) for name in groups[0].scores[0]}
    return {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
            "flat_groups": float(np.mean(rewards.std(-1) == 0)),  # groups with no learning signal
            "completion_tokens": float(np.mean([len(c) for g in groups for c in g.completions])),
            **{f"reward_{k}": v for k, v in parts.items()}}


@torch.no_grad()
def heldout_reward(model: GPT, tokenizer, prompts: Sequence, rewards, max_new_tokens: int,
                   temperature: float = 0.0, seed: int = 0, samples: int = 1) -> dict:
    """Mean reward (and each part) over held-out prompts: one greedy completion each by default, else
    `samples` sampled ones with a fixed seed per prompt, so two models are compared on the same draws."""
    rewards = combine_rewards(rewards)
    stops = stop_ids(tokenizer)
    scores = []
    for n, prompt in enumerate(map(as_rl_prompt, prompts)):
        ids = rollout_prompt_ids(tokenizer, prompt.prompt, model.cfg.block_size, max_new_tokens)
        k = samples if temperature > 0 else 1
        for completion in sample_ids(model, ids, k, max_new_tokens, temperature, seed + n, stops):
            scores.append(rewards.score(prompt.prompt, decode_response(tokenizer, completion), prompt.ctx))
    out = {"heldout_reward": float(np.mean([rewards.total(s) for s in scores]))}
    for name in scores[0]:
        out[f"heldout_{name}"] = float(np.mean([s[name] for s in scores]))
    return out


# --- the loop ------------------------------------------------------------------------------------------
def train_grpo(policy: GPT, tokenizer, prompts: Sequence, rewards, cfg: TrainConfig, rl: GRPOConfig,
               out_dir: Path, heldout_prompts: Sequence = (), resume: bool = False) -> dict:
    """Optimize `policy` in place. Prompts are anything `as_rl_prompt` takes; rewards a Rewards, a callable
    or {name: callable}. Writes out_dir/checkpoints/ and out_dir/metrics.jsonl (rows of kind "train"
    and, with held-out prompts, "eval" at step 0, every cfg.eval_every steps and at the end)."""
    prompts = [as_rl_prompt(p) for p in prompts]
    if not prompts:
        raise LatheError("no prompts to train on")
    if rl.max_new_tokens >= policy.cfg.block_size:
        raise LatheError(f"max_new_tokens ({rl.max_new_tokens}) must be below block_size ({policy.cfg.block_size})")
    rewards = combine_rewards(rewards)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root, metrics_path = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    policy.to(device).eval()
    reference = frozen_copy(policy) if rl.kl_coef > 0 else None  # the policy as given, before any resume
    optimizer = make_optimizer(policy, cfg, device)
    autocast = autocast_context(device, cfg.dtype)
    state = {"kind": "policy", "stage": "grpo", "best_reward": None, "best_checkpoint": None, "elapsed_s": 0.0,
             "first_eval": {}, "last_eval": {}}
    step = 0
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    if ckpt is not None:
        step = restore(ckpt, policy, optimizer, state)
        truncate_metrics(metrics_path, step)
        info(f"resuming grpo from {ckpt} (step {step})")
    elif metrics_path.exists():
        metrics_path.unlink()

    def evaluate(at: int) -> dict:
        with autocast:
            m = heldout_reward(policy, tokenizer, heldout_prompts, rewards, rl.max_new_tokens, rl.eval_temperature,
                               cfg.seed, rl.eval_samples)
        append_jsonl(metrics_path, {"step": at, "kind": "eval", **m})
        state["last_eval"] = m
        return m

    saved_at = {step}

    def checkpoint(at: int) -> None:
        if at not in saved_at:
            saved_at.add(at)
            save_checkpoint(ckpt_root, at, policy, optimizer, state, keep=cfg.keep_checkpoints)

    if heldout_prompts and step == 0:
        state["first_eval"] = evaluate(0)
    run_start = time.perf_counter() - state["elapsed_s"]
    stopped = "max_steps"
    with progress_bar() as bar:
        task = bar.add_task("grpo", total=cfg.max_steps, completed=step, status="")
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            set_lr(optimizer, lr)
            rng = np.random.default_rng([cfg.seed, step])  # the step's prompts and sampling seeds
            picks = rng.integers(0, len(prompts), size=rl.prompts_per_step)
            seeds = rng.integers(0, 2**31 - 1, size=rl.prompts_per_step)
            with autocast:
                groups = rollout(policy, tokenizer, [prompts[i] for i in picks], seeds, rewards, rl)
            generator = torch.Generator().manual_seed(int(seeds[0]))
            update = policy_update(policy, reference, optimizer, groups, rl, cfg, tokenizer.pad_id, autocast, generator)
            step += 1
            state["elapsed_s"] = time.perf_counter() - run_start
            stats = step_stats(groups)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                append_jsonl(metrics_path, {"step": step, "kind": "train", "lr": lr, **update, **stats,
                                            "elapsed_s": state["elapsed_s"]})
            bar.update(task, completed=step, status=f"reward {stats['reward']:.3f}")
            out_of_time = cfg.max_time_s is not None and state["elapsed_s"] > cfg.max_time_s
            final = step == cfg.max_steps or out_of_time
            if heldout_prompts and (step % cfg.eval_every == 0 or final):
                reward = evaluate(step)["heldout_reward"]
                if state["best_reward"] is None or reward > state["best_reward"]:
                    state.update(best_reward=reward, best_checkpoint=f"step-{step:06d}")
                    checkpoint(step)
            if step % cfg.checkpoint_every == 0 or final:
                checkpoint(step)
            if out_of_time:
                stopped = "time_budget"
                break
    return {"before": state["first_eval"], "after": state["last_eval"], "steps": step, "stopped": stopped,
            "best_reward": state["best_reward"], "best_checkpoint": state["best_checkpoint"]}


# --- the stage ---------------------------------------------------------------------------------------
RL_DEFAULTS = {"max_steps": 100, "lr": 1e-4, "warmup_steps": 5, "schedule": "constant", "weight_decay": 0.0,
               "eval_every": 10, "checkpoint_every": 25, "log_every": 1}


def run_rl(base, reward: str | None = None, prompts=None, heldout_prompts=None, task: str | None = None,
           n_prompts: int = 1000, heldout: int = 64, reward_model=None, out=None, name=None, overrides=(),
           rl_options: dict | None = None, resume: bool = False) -> dict:
    """`lathe align rl`: GRPO on a base run's model with verifier rewards; writes <out>/rl_report.{md,json}.

    Prompts come from a file (`prompts`, with `heldout` of them held out unless `heldout_prompts` is
    given) or from a lathe.verify task generator (`task`, whose verifier is then the default reward)."""
    from pydantic import ValidationError

    from lathe.align.pairs import open_stage, read_prompts, task_prompts
    from lathe.config import format_validation_error
    from lathe.finetune.sft import markdown_table, write_stage_report

    stage = open_stage(base, out, name, "rl", RL_DEFAULTS, overrides, section="rl")
    try:
        rl = GRPOConfig(**{**(rl_options or {}), **stage.section})
    except ValidationError as e:
        raise LatheError(format_validation_error(e, "RL options")) from None
    seed = stage.train.seed
    if prompts:
        train_items = read_prompts(prompts)
        held_items = read_prompts(heldout_prompts) if heldout_prompts else []
        if not heldout_prompts and heldout:
            order = np.random.default_rng(seed).permutation(len(train_items))
            held_items = [train_items[i] for i in order[:heldout]]
            train_items = [train_items[i] for i in order[heldout:]]
    elif task:
        train_items = task_prompts(task, n_prompts, seed)
        seen = set(train_items)
        held_items = [p for p in task_prompts(task, heldout, seed + 1) if p not in seen]
    else:
        raise LatheError("give prompts: --prompts FILE or --task KIND (addition, sorting, reversal)")
    policy = stage.load_model()
    extra = {}
    if reward_model:
        from lathe.align.reward import load_reward_model, reward_from_model

        extra["reward_model"] = reward_from_model(load_reward_model(reward_model), stage.tokenizer)
    rewards = rewards_from_spec(reward or (task if not reward_model else None), extra)
    summary = train_grpo(policy, stage.tokenizer, train_items, rewards, stage.train, rl, stage.out, held_items,
                         resume=resume)
    summary.update(base=str(stage.base.path), rewards={n: w for n, w, _ in rewards.parts}, rl=rl.model_dump(),
                   train_prompts=len(train_items), heldout_prompts=len(held_items))
    b, a = summary["before"], summary["after"]
    rows = [[k, b.get(k), a.get(k)] for k in a]
    write_stage_report(stage.out, "rl", "RL with verifiable rewards (GRPO)", summary, [
        "## Held-out reward", "", f"{len(held_items)} held-out prompts, {len(train_items)} training prompts, "
        f"{summary['steps']} steps ({summary['stopped']}); rewards {summary['rewards']} (weighted mean); "
        f"{'greedy' if rl.eval_temperature == 0 else f'{rl.eval_samples} samples at T={rl.eval_temperature}'} "
        "completions.", "", *markdown_table(["metric", "before", "after"], rows)])
    if a:
        info(f"rl: held-out reward {b.get('heldout_reward', float('nan')):.3f} -> {a['heldout_reward']:.3f} "
             f"({len(held_items)} prompts, {summary['steps']} steps)")
    return summary

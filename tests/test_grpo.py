"""GRPO with verifiable rewards: the pieces, and a tiny addition task where RL must beat no update.

The weak start: a 2-layer model briefly SFT-ed on single-digit addition ("3+4=" -> "7") whose
demonstrations end in a hedging "?" 60% of the time ("7?"). The registry's `addition` verifier
rejects "7?", so the start model's sampled answers score low on held-out prompts. GRPO with that
verifier plus a small plain-callable format reward must raise the held-out reward, measured with the
same prompts and the same sampling seeds as the untouched start model (the no-update control).
Operands are single digits so the SFT that makes the start takes seconds; with 2-digit operands a
model this small needs minutes of SFT before its answers are right often enough for RL to work with.
"""

import copy
import json

import numpy as np
import pytest
import torch

from lathe.align.grpo import (GRPOConfig, Rewards, as_rl_prompt, clipped_policy_loss, combine_rewards,
                              group_advantages, heldout_reward, k3_kl, parse_reward_spec, rewards_from_spec,
                              train_grpo)
from lathe.align.pairs import encode_prompt, encode_response, lm_batch
from lathe.cli import main
from lathe.config import ModelConfig, TokenizerConfig, TrainConfig
from lathe.errors import LatheError
from lathe.io import read_jsonl
from lathe.model import GPT
from lathe.tokenizer import train_tokenizer
from lathe.train.loop import train
from lathe.verify import combine, get_verifier

PROBLEMS = [(a, b) for a in range(10) for b in range(10)]
PROMPTS = [f"{a}+{b}=" for a, b in PROBLEMS]


def digits_only(prompt: str, completion: str) -> float:
    return float(completion.strip().isdigit())


def rewards() -> Rewards:
    return combine_rewards({"addition": get_verifier("addition"), "format": digits_only},
                           {"addition": 1.0, "format": 0.2})


@pytest.fixture(scope="module")
def weak_start(tmp_path_factory):
    """(run dir, tokenizer, model) after 100 SFT steps on hedged single-digit addition."""
    run = tmp_path_factory.mktemp("sft")
    tok = train_tokenizer([f"{a}+{b}={a + b}?" for a, b in PROBLEMS] * 3, TokenizerConfig(vocab_size=300))
    tok.save(run / "tokenizer.json")

    def sft_batch(i):
        rng = np.random.default_rng([0, i])
        rows = []
        for j in rng.integers(0, len(PROMPTS), 32):
            answer = str(sum(PROBLEMS[j])) + ("?" if rng.random() < 0.6 else "")
            rows.append((encode_prompt(tok, PROMPTS[j]), encode_response(tok, PROMPTS[j], answer)))
        return lm_batch(rows, tok.pad_id)

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=64, block_size=16))
    cfg = TrainConfig(max_steps=100, batch_size=32, lr=3e-3, warmup_steps=10, schedule="constant", weight_decay=0.0,
                      log_every=50, checkpoint_every=100, device="cpu")
    train(model, cfg, sft_batch, None, run)
    return run, tok, model


def test_group_advantages_clipping_and_kl():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]]))
    assert torch.allclose(adv[0], torch.tensor([3.0, -1.0, -1.0, -1.0]) / 3**0.5, atol=1e-3)
    assert torch.equal(adv[1], torch.zeros(4))  # a group of equal rewards teaches nothing
    assert torch.allclose(group_advantages(torch.tensor([[1.0, 0.0]]), scale_by_std=False), torch.tensor([[0.5, -0.5]]))

    # a token whose ratio is already past 1 + eps in the advantage's direction gets no gradient
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-0.5, 0.0]])  # ratio e^0.5 > 1.2 for the first token, 1 for the second
    loss, stats = clipped_policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), 0.2)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0 and stats["clip_frac"] == 0.5
    # k3 is >= 0 everywhere and 0 only where the policy and reference agree
    a, b = torch.tensor([-1.0, -2.0, -0.1]), torch.tensor([-1.0, -0.5, -3.0])
    kl = k3_kl(a, b)
    assert kl[0] == 0 and (kl[1:] > 0).all()


def test_rewards_combine_like_the_verifier_registry():
    spec = parse_reward_spec("addition, format:0.25")
    assert spec == {"addition": 1.0, "format": 0.25}
    r = rewards_from_spec("addition,format:0.25", extra={"format": digits_only})
    verify_combined = combine([get_verifier("addition"), digits_only_verdict], [1.0, 0.25])
    for completion in ["7", "7?", "8", "seven"]:
        assert abs(r("3+4=", completion) - verify_combined("3+4=", completion).score) < 1e-9
    assert r.score("3+4=", "7?") == {"addition": 0.0, "format": 0.0}
    assert as_rl_prompt({"prompt": "3+4=", "expected": "8"}).ctx == {"expected": "8"}
    assert r.score("3+4=", "8", {"expected": "8"})["addition"] == 1.0  # ctx reaches the verifier
    with pytest.raises(LatheError, match="unknown verifier"):
        rewards_from_spec("no_such_verifier")
    with pytest.raises(LatheError, match="number"):
        parse_reward_spec("addition:heavy")


def digits_only_verdict(prompt, answer, **ctx):
    from lathe.verify import Verdict

    return Verdict(digits_only(prompt, answer), "digits")


def test_grpo_raises_heldout_reward_over_the_no_update_control(weak_start, tmp_path):
    _, tok, start = weak_start
    order = np.random.default_rng(0).permutation(len(PROMPTS))
    heldout, train_prompts = [PROMPTS[i] for i in order[:25]], [PROMPTS[i] for i in order[25:]]
    rl = GRPOConfig(group_size=8, prompts_per_step=8, max_new_tokens=3, inner_epochs=2, kl_coef=0.01,
                    eval_temperature=1.0, eval_samples=8)
    cfg = TrainConfig(max_steps=20, lr=3e-4, warmup_steps=0, schedule="constant", weight_decay=0.0, eval_every=10,
                      log_every=5, checkpoint_every=10, seed=0, device="cpu")

    control = heldout_reward(start, tok, heldout, rewards(), rl.max_new_tokens, 1.0, cfg.seed, rl.eval_samples)
    policy = copy.deepcopy(start)
    summary = train_grpo(policy, tok, train_prompts, rewards(), cfg, rl, tmp_path, heldout)

    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[0]["heldout_reward"] == control["heldout_reward"]  # the curve starts at the control
    assert control["heldout_reward"] < 0.4  # a weak start ...
    assert control["heldout_addition"] > 0.02  # ... but not a hopeless one
    after = summary["after"]
    assert after["heldout_reward"] > control["heldout_reward"] + 0.1, (control, evals)
    assert after["heldout_addition"] > control["heldout_addition"] + 0.05, (control, evals)  # answers, not only format
    # the start model is untouched, the KL penalty ran, training rows carry the reward parts
    assert heldout_reward(start, tok, heldout, rewards(), 3, 1.0, cfg.seed, 8) == control
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 4 and all(r["kl"] >= 0 for r in rows) and rows[-1]["kl"] > 0
    assert {"reward_addition", "reward_format", "clip_frac", "flat_groups"} <= rows[0].keys()


def test_rl_cli_runs_on_a_task_and_resumes(weak_start, tmp_path):
    run, _, _ = weak_start
    out = tmp_path / "rl"
    args = ["align", "rl", "--base", str(run), "--out", str(out), "--task", "addition", "--n-prompts", "12",
            "--heldout", "4", "--reward", "addition", "--group-size", "2", "--prompts-per-step", "2",
            "--max-new-tokens", "4", "--device", "cpu", "--set", "train.eval_every=2", "--set", "rl.inner_epochs=1"]
    assert main(args + ["--steps", "2", "--reward", "no_such_verifier"]) == 2  # a clear error, exit 2
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "3", "--resume"]) == 0
    report = json.loads((out / "rl_report.json").read_text())
    assert report["steps"] == 3 and report["heldout_prompts"] <= 4 and (out / "tokenizer.json").exists()
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3]  # the resumed run continued the curve
    assert report["before"]["heldout_reward"] == read_jsonl(out / "metrics.jsonl")[0]["heldout_reward"]


def test_pairs_cli_ranks_the_models_own_answers_with_a_verifier(weak_start, tmp_path):
    run, _, _ = weak_start
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[::7]) + "\n")
    out = tmp_path / "pairs.jsonl"
    assert main(["align", "pairs", "--base", str(run), "--prompts", str(prompts), "--verifier", "addition",
                 "--k", "6", "--max-tokens", "3", "--out", str(out)]) == 0
    rows = read_jsonl(out)
    assert len(rows) >= 3  # the weak model is right on some samples of a prompt and wrong on others
    check = get_verifier("addition")
    for row in rows:
        assert check(row["prompt"], row["chosen"]).score == 1 and check(row["prompt"], row["rejected"]).score == 0

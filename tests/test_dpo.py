"""Preference pairs (files, chat form, ranked own samples) and DPO on a learnable synthetic preference.

The reference is a tiny model SFT-ed on replies of both kinds (vowel-only words and consonant-only
words, half and half); the pairs prefer the vowel words. DPO must push held-out preference accuracy
above 90% while the policy stays near the reference, and more so with a larger beta.
"""

import copy
import functools
import json
import re

import numpy as np
import pytest
import torch

from lathe.align.dpo import dpo_loss, frozen_copy, preference_metrics, train_dpo
from lathe.align.pairs import (encode_prompt, lm_batch, load_pairs, pairs_from_judge, pairs_from_verifier,
                               sample_responses, split_holdout, tokenize_pair)
from lathe.cli import main
from lathe.config import ModelConfig, TokenizerConfig, TrainConfig
from lathe.errors import LatheError
from lathe.model import GPT
from lathe.tokenizer import train_tokenizer
from lathe.train.loop import train
from lathe.verify import judge_pair

VOWELS, CONSONANTS = "aeiou", "bcdfghjklmnpqrstvwxz"


def word(rng, letters: str, n: int) -> str:
    return "".join(rng.choice(list(letters), n))


def preference_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": f"say {word(rng, VOWELS + CONSONANTS, 3)}:", "chosen": " " + word(rng, VOWELS, 4),
             "rejected": " " + word(rng, CONSONANTS, 4)} for _ in range(n)]


def vowel_share(prompt: str, reply: str) -> float:
    letters = [c for c in reply if c.isalpha()]
    return sum(c in VOWELS for c in letters) / max(1, len(letters))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(run dir, tokenizer, pairs, model) with the model SFT-ed on chosen and rejected replies alike."""
    run = tmp_path_factory.mktemp("ref")
    rows = preference_rows(600, seed=0)
    tok = train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], TokenizerConfig(vocab_size=300))
    tok.save(run / "tokenizer.json")
    (run / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [tokenize_pair(tok, r, 33) for r in rows]

    def both_kinds(i):
        rng = np.random.default_rng([1, i])
        picks = [(pairs[j], rng.random() < 0.5) for j in rng.integers(0, len(pairs), 32)]
        return lm_batch([(p.prompt_ids, p.chosen_ids if vowel else p.rejected_ids) for p, vowel in picks], tok.pad_id)

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=64, block_size=32))
    cfg = TrainConfig(max_steps=120, batch_size=32, lr=3e-3, warmup_steps=10, weight_decay=0.0, log_every=60,
                      checkpoint_every=120, device="cpu")
    train(model, cfg, both_kinds, None, run)
    return run, tok, pairs, model.eval()


# --- pairs ---------------------------------------------------------------------------------------------
def test_pairs_files_name_the_bad_line_and_accept_chat_prompts(reference, tmp_path):
    _, tok, _, _ = reference
    good = {"prompt": "say abc:", "chosen": " aeio", "rejected": " bcdf"}
    chat = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say abc"}],
            "chosen": "aeio", "rejected": "bcdf"}
    cases = {"{not json": "not valid JSON", json.dumps({"prompt": "x", "chosen": "a"}): "missing field(s) rejected",
             json.dumps({**good, "chosen": 3}): "'chosen' must be a string",
             json.dumps({**good, "rejected": good["chosen"]}): "identical",
             json.dumps({**good, "prompt": [{"role": "robot"}]}): "role"}
    for bad, message in cases.items():
        path = tmp_path / "pairs.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + bad + "\n")
        with pytest.raises(LatheError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
            load_pairs(path, tok, 32)

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(chat) + "\n" + json.dumps(good) + "\n")
    chat_pair, text_pair = load_pairs(path, tok, 32)
    assert chat_pair.prompt_ids[-1] == tok.special_id("<|assistant_start|>")
    assert chat_pair.chosen_ids == tok.encode("aeio") + [tok.special_id("<|assistant_end|>")]
    assert text_pair.prompt_ids == encode_prompt(tok, "say abc:") and text_pair.rejected_ids[-1] == tok.eos_id
    # a pair too long for the context keeps the prompt's newest tokens and the responses' heads
    long = tokenize_pair(tok, {**good, "prompt": "say " + "abc " * 40}, 20)
    assert len(long.prompt_ids) + len(long.chosen_ids) <= 20 and long.chosen_ids == text_pair.chosen_ids

    x, y = lm_batch([([0, 5], [6, 7]), ([0], [8])], pad_id=2)
    assert x.tolist() == [[0, 5, 6], [0, 2, 2]] and y.tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_pairs_from_the_models_own_samples(reference):
    _, tok, _, model = reference
    prompts = ["say abc:", "say xyz:", "say qed:", "say ogu:"]
    rows = pairs_from_verifier(model, tok, prompts, vowel_share, k=6, max_tokens=8, seed=3)
    assert rows and all(r["chosen_score"] > r["rejected_score"] for r in rows)
    assert all(vowel_share("", r["chosen"]) == r["chosen_score"] for r in rows)
    samples = sample_responses(model, tok, prompts[0], 6, 8, 1.0, 3)
    assert rows[0]["chosen"] in samples and rows[0]["rejected"] in samples  # ranked, not invented

    judge = functools.partial(judge_pair, scorer=vowel_share)  # lathe.verify's A/B judge
    judged = pairs_from_judge(model, tok, prompts, judge, k=6, max_tokens=8, seed=3)
    assert [(r["chosen"], r["rejected"]) for r in judged] == [(r["chosen"], r["rejected"]) for r in rows]


# --- DPO -----------------------------------------------------------------------------------------------
def test_dpo_loss_matches_the_formula():
    loss, c, r = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert torch.allclose(c, torch.tensor([0.5])) and torch.allclose(r, torch.tensor([-0.5]))
    assert torch.allclose(loss, -torch.nn.functional.logsigmoid(torch.tensor([1.0])))


def test_dpo_learns_held_out_preferences_and_stays_near_the_reference(reference, tmp_path):
    _, tok, pairs, ref_model = reference
    train_pairs, val_pairs = split_holdout(pairs, 1 / 6, seed=0)
    cfg = TrainConfig(max_steps=60, batch_size=8, lr=3e-4, warmup_steps=5, weight_decay=0.0, eval_every=30,
                      log_every=30, checkpoint_every=60, device="cpu")
    runs = {}
    for sft_weight in (0.0, 0.2):  # plain DPO, and DPO + NLL of the chosen replies
        policy = copy.deepcopy(ref_model)
        runs[sft_weight] = train_dpo(policy, tok, train_pairs, val_pairs, cfg, tmp_path / f"w{sft_weight}", 0.1,
                                     sft_weight)
        runs[sft_weight]["policy"] = policy
    for run in runs.values():
        before, after = run["before"], run["after"]
        assert before["accuracy"] == 0 and before["kl_per_token"] == 0  # policy == reference: rewards tie at 0
        assert after["accuracy"] > 0.9 and after["reward_margin"] > 0, after
        assert 0 < after["kl_per_token"] < 3.0, after
    # KL per reply (sampled from the policy). From the reference's half-and-half mix to vowel words alone
    # is about log 2 = 0.7 nats; DPO + NLL stays near that. Plain DPO also lowers the chosen replies'
    # likelihood and moves mass to replies neither side has (empty ones): further, yet bounded.
    plain, nll = runs[0.0]["after"], runs[0.2]["after"]
    assert 0 < nll["kl_sampled"] < 3.0 and nll["chosen_reward"] > 0, nll
    assert nll["kl_sampled"] < plain["kl_sampled"] < 10.0, plain
    assert preference_metrics(ref_model, frozen_copy(ref_model), val_pairs, 0.1, tok)["kl_sampled"] == 0

    prompts = [f"say {w}:" for w in ("abc", "xyz", "ugo", "pqr", "lem", "ion")]

    def replies(model):
        return [s for p in prompts for s in sample_responses(model, tok, p, 8, 6, 1.0, 0)]

    def vowels(texts):
        return np.mean([vowel_share("", t) for t in texts])

    def empty(texts):
        return np.mean([not t.strip() for t in texts])

    tuned, plain_replies = replies(runs[0.2]["policy"]), replies(runs[0.0]["policy"])
    assert vowels(tuned) > vowels(replies(ref_model)) + 0.2  # what the policy now says, not only how it scores
    assert empty(tuned) < 0.2 and empty(tuned) < empty(plain_replies)  # the NLL term keeps it answering


def test_dpo_cli(reference, tmp_path):
    run, _, _, _ = reference
    out = tmp_path / "dpo"
    assert main(["align", "dpo", "--base", str(run), "--data", str(run / "pairs.jsonl"), "--out", str(out),
                 "--beta", "0.2", "--steps", "3", "--device", "cpu", "--set", "train.eval_every=3"]) == 0
    report = json.loads((out / "dpo_report.json").read_text())
    assert report["beta"] == 0.2 and report["steps"] == 3 and report["after"]["pairs"] == 60
    assert main(["align", "dpo", "--base", str(run), "--data", str(run / "pairs.jsonl"), "--out", str(out),
                 "--sft-weight", "0.5", "--steps", "4", "--resume", "--device", "cpu"]) == 0
    assert json.loads((out / "dpo_report.json").read_text())["steps"] == 4  # resumed from step 3
    assert main(["align", "dpo", "--base", str(run), "--data", str(run / "pairs.jsonl"), "--out", str(out),
                 "--beta", "0"]) == 2

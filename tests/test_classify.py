import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lathe.config import ModelConfig, TokenizerConfig
from lathe.errors import LatheError
from lathe.eval.metrics import classification_report
from lathe.finetune.classify import (Classifier, EncodedSplit, average_classifiers, classifier_checkpoint,
                                     classifier_state, classify_loss_fn, load_classifier, mcnemar_p,
                                     paired_comparison, predict, predict_proba, read_labeled, read_polarity,
                                     run_classify, score_ensemble, split_labeled)
from lathe.finetune.sft import load_base_model
from lathe.io import read_jsonl
from lathe.model import GPT
from lathe.tokenizer import train_tokenizer
from lathe.train.checkpoint import save_checkpoint

CUES = {"pos": ["great", "lovely", "superb"], "neg": ["awful", "dull", "boring"], "mixed": ["odd", "strange", "weird"]}
FILLER = ["the", "film", "was", "plot", "actors", "a", "story", "and", "it"]
TRAIN = ["train.max_steps=60", "train.lr=0.003", "train.warmup_steps=5", "train.eval_every=30", "train.batch_size=16",
         "train.checkpoint_every=30", "train.device=cpu"]


def keyword_examples(n: int, seed: int = 0) -> list[dict]:
    """The label is given away by one cue word among filler: learnable in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(sorted(CUES))
        words = rng.choices(FILLER, k=rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), rng.choice(CUES[label]))
        rows.append({"text": " ".join(words) + f" {i}", "label": label})  # the number keeps texts unique
    return rows


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A run directory with a tokenizer and a random-init checkpoint: the smallest base for fine-tuning."""
    path = tmp_path_factory.mktemp("base")
    texts = [r["text"] for r in keyword_examples(500, 1)]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=1))
    tok.save(path / "tokenizer.json")
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=32))
    save_checkpoint(path / "checkpoints", 0, model, None, {})
    return path, tok


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_classifier_learns_and_its_report_matches_its_predictions(tmp_path, base_run):
    base, tok = base_run
    data = write_jsonl(tmp_path / "data.jsonl", keyword_examples(600))
    out = tmp_path / "clf"
    summary = run_classify(base, [data], out=out, overrides=TRAIN)
    assert summary["lathe"]["accuracy"] >= 0.9, summary["lathe"]
    assert summary["baseline"]["accuracy"] >= 0.9  # the cue words make it easy for bag-of-words too

    # the saved classifier reloads (head included) and reproduces the reported test metrics
    model = load_classifier(out)
    assert model.labels == ["mixed", "neg", "pos"]
    rows = [(r["text"], r["label"]) for r in read_jsonl(data)]
    test = split_labeled(rows)["test"]
    preds, _ = predict(model, EncodedSplit(tok, test, model.labels, 32))
    y_true, y_pred = [lb for _, lb in test], [model.labels[i] for i in preds]
    expected = classification_report(y_true, y_pred, model.labels)
    assert summary["lathe"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert summary["lathe"]["macro"] == pytest.approx(expected["macro"])
    matrix = np.asarray(summary["lathe"]["confusion_matrix"])
    assert matrix.sum() == len(test) == summary["counts"]["test"]
    assert matrix.trace() == sum(t == p for t, p in zip(y_true, y_pred))
    for i, label in enumerate(model.labels):  # rows are the true label
        assert matrix[i].sum() == y_true.count(label) and matrix[:, i].sum() == y_pred.count(label)
    report = (out / "classify_report.md").read_text()
    assert "bag-of-words logistic regression" in report and "confusion matrix" in report


def test_resume_continues_from_the_checkpoint(tmp_path, base_run):
    base, _ = base_run
    data = write_jsonl(tmp_path / "data.jsonl", keyword_examples(120))
    out = tmp_path / "clf"
    small = ["train.lr=0.003", "train.checkpoint_every=3", "train.eval_every=3", "train.batch_size=4",
             "train.device=cpu", "train.log_every=1"]
    run_classify(base, [data], out=out, overrides=small + ["train.max_steps=3"], baseline=False)
    summary = run_classify(base, [data], out=out, overrides=small + ["train.max_steps=6"], resume=True, baseline=False)
    assert summary["steps"] == 6
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # one continuous curve, not a restart


def test_readers_and_errors_name_file_and_line(tmp_path):
    (tmp_path / "a.csv").write_text("label,text\npos,\"nice, really\"\nneg,bad\n")
    (tmp_path / "a.tsv").write_text("text\tlabel\nnice\t1\n")
    assert read_labeled(tmp_path / "a.csv") == [("nice, really", "pos"), ("bad", "neg")]
    assert read_labeled(tmp_path / "a.tsv") == [("nice", "1")]
    bad = {
        "b.jsonl": ('{"text": "x", "label": "a"}\n{"text": "y"}\n', ":2"),
        "c.jsonl": ('{"text": "x", "label": "a"}\n\n{oops\n', ":3"),
        "d.csv": ("text,label\nfine,a\nshort\n", ":3"),
        "e.csv": ("words,label\nx,a\n", ":1"),
    }
    for name, (content, where) in bad.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(LatheError, match=f"{name}{where}"):
            read_labeled(tmp_path / name)
    # polarity files are latin-1, not UTF-8
    (tmp_path / "rt-polarity.pos").write_bytes("a caf\xe9 film \n\nfun\n".encode("latin-1"))
    (tmp_path / "rt-polarity.neg").write_bytes(b"dull\n")
    assert read_polarity(tmp_path) == [("a caf\xe9 film", "pos"), ("fun", "pos"), ("dull", "neg")]


def test_split_depends_only_on_the_text():
    rows = [(f"sentence {i}", "a" if i % 2 else "b") for i in range(2000)]
    splits = split_labeled(rows)
    again = split_labeled(list(reversed(rows)))
    assert {k: sorted(v) for k, v in splits.items()} == {k: sorted(v) for k, v in again.items()}
    assert 150 < len(splits["val"]) < 250 and 150 < len(splits["test"]) < 250
    with pytest.raises(LatheError, match="split is empty"):
        split_labeled(rows[:2])


def test_polarity_files_load_and_split(shared_data):
    rows = read_polarity(shared_data / "classify")
    assert len(rows) == 10662
    assert sum(lb == "pos" for _, lb in rows) == sum(lb == "neg" for _, lb in rows) == 5331
    splits = split_labeled(rows)
    assert sum(len(v) for v in splits.values()) == 10662
    assert all(900 < len(splits[s]) < 1250 for s in ("val", "test"))


def test_lora_trains_adapters_and_the_head_only(tmp_path, base_run):
    base, _ = base_run
    data = write_jsonl(tmp_path / "data.jsonl", keyword_examples(120))
    out = tmp_path / "clf"
    run_classify(base, [data], out=out, lora=True, baseline=False,
                 overrides=["train.max_steps=4", "train.batch_size=4", "train.device=cpu", "train.lr=0.01"])
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    merged, start = load_classifier(out / "merged"), load_base_model(base)
    assert torch.equal(merged.gpt.embed.weight, start.embed.weight)  # frozen
    assert torch.equal(merged.gpt.blocks[0].mlp.up_proj.weight, start.blocks[0].mlp.up_proj.weight)  # not a target
    assert not torch.equal(merged.gpt.blocks[0].attn.q_proj.weight, start.blocks[0].attn.q_proj.weight)  # merged
    assert merged.head.weight.abs().sum() > 0


def test_cli_verbs_parse_and_reach_the_stages(tmp_path, base_run):
    import argparse

    from lathe.finetune.cli import overrides_of, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "classify", "--base", str(base_run[0]), "--data",
                              str(tmp_path / "none.jsonl"), "--steps", "5", "--lr", "0.01", "--set", "train.lr=0.02",
                              "--pooling", "channel", "--lm-weight", "0.5", "--head-dropout", "0.1",
                              "--freeze-steps", "2", "--body-lr-scale", "0.5", "--select", "accuracy"])
    assert (args.pooling, args.lm_weight, args.body_lr_scale, args.select) == ("channel", 0.5, 0.5, "accuracy")
    assert overrides_of(args) == ["train.max_steps=5", "train.lr=0.01", "train.lr=0.02"]  # --set comes last, wins
    with pytest.raises(LatheError, match="none.jsonl does not exist"):
        args.handler(args)
    args = parser.parse_args(["distill", "--teacher", str(tmp_path / "nowhere"), "--set", "model.n_layer=1"])
    with pytest.raises(LatheError, match="nowhere does not exist"):
        args.handler(args)
    args = parser.parse_args(["finetune", "sft", "--base", str(base_run[0]), "--data", "x.jsonl", "--set", "data.x=1"])
    with pytest.raises(LatheError, match="train.FIELD=VALUE or model.FIELD=VALUE"):
        args.handler(args)


# --- the options of issue 5: auxiliary LM loss, pooling, head-only warm-up, selection, paired test ------
def tiny_classifier(pooling="mean", head_dropout=0.0, tie=True):
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=16, tie_embeddings=tie))
    return Classifier(gpt, ["a", "b"], pooling, head_dropout, train_lm_head=True)


def test_auxiliary_lm_loss_is_the_gpt_loss_on_real_tokens_only():
    model = tiny_classifier().eval()
    ids = torch.tensor([[1, 5, 7, 9, 11], [1, 4, 6, 0, 0]])  # row 2: 3 real tokens, then pads
    lengths = torch.tensor([5, 3])
    _, lm = model(ids, lengths, lm_loss=True)
    _, loss_1 = model.gpt(ids[:1, :-1], targets=ids[:1, 1:])
    _, loss_2 = model.gpt(ids[1:, :2], targets=ids[1:, 1:3])
    # token-weighted mean over the 4 + 2 real targets; the pads never count
    assert lm.item() == pytest.approx((4 * loss_1.item() + 2 * loss_2.item()) / 6, rel=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "meanmax", "last"])
def test_pooling_ignores_pads(pooling):
    model = tiny_classifier(pooling).eval()
    torch.nn.init.normal_(model.head.weight)  # a non-zero head, so logits depend on the features
    short = model(torch.tensor([[1, 5, 7]]), torch.tensor([3]))
    padded = model(torch.tensor([[1, 5, 7, 0, 0]]), torch.tensor([3]))
    assert torch.allclose(short, padded, atol=1e-6)
    if pooling == "meanmax":
        h = model.gpt.hidden_states(torch.tensor([[1, 5, 7]]))[0]
        expected = torch.cat([h.mean(0), h.amax(0)]) @ model.head.weight.T + model.head.bias
        assert torch.allclose(short[0], expected, atol=1e-5)


def test_head_dropout_acts_in_training_only():
    model = tiny_classifier(head_dropout=0.5)
    torch.nn.init.normal_(model.head.weight)
    ids, lengths = torch.tensor([[1, 5, 7, 9]] * 8), torch.tensor([4] * 8)
    model.train()
    assert not torch.allclose(model(ids, lengths)[0], model(ids, lengths)[1])  # rows differ by their mask
    model.eval()
    assert torch.allclose(model(ids, lengths)[0], model(ids, lengths)[1])


def test_predict_scores_without_dropout_and_restores_the_mode(base_run):
    _, tok = base_run
    model = tiny_classifier(head_dropout=0.9)
    model.gpt = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=32, dropout=0.5))
    torch.nn.init.normal_(model.head.weight)
    split = EncodedSplit(tok, [(r["text"], "a") for r in keyword_examples(200)], ["a", "b"], 32)
    model.train()
    first, nll = predict(model, split)
    assert model.training
    model.eval()
    again, nll_again = predict(model, split)
    assert np.array_equal(first, again) and nll == pytest.approx(nll_again)


def test_frozen_body_gets_no_gradient():
    loss_fn = classify_loss_fn(lm_weight=0.5, freeze_batches=2)
    batch = (torch.tensor([[1, 5, 7]]), torch.tensor([3]), torch.tensor([1]))
    for index, body_learns in ((1, False), (2, True)):
        model = tiny_classifier()
        torch.nn.init.normal_(model.head.weight)
        loss_fn(model, (*batch, torch.tensor([index]))).backward()
        assert model.head.weight.grad is not None
        assert (model.gpt.blocks[0].attn.q_proj.weight.grad is not None) == body_learns


def _gpt_weights_equal(summary_out, base) -> bool:
    trained, start = load_classifier(summary_out), load_base_model(base)
    return torch.equal(trained.gpt.blocks[0].mlp.up_proj.weight, start.blocks[0].mlp.up_proj.weight)


def test_freeze_steps_train_the_head_alone_then_the_body(tmp_path, base_run):
    base, _ = base_run
    data = write_jsonl(tmp_path / "data.jsonl", keyword_examples(120))
    small = ["train.max_steps=4", "train.batch_size=4", "train.device=cpu", "train.lr=0.01", "train.eval_every=4"]
    run_classify(base, [data], out=tmp_path / "frozen", overrides=small, freeze_steps=4, baseline=False)
    assert _gpt_weights_equal(tmp_path / "frozen", base)
    assert load_classifier(tmp_path / "frozen").head.weight.abs().sum() > 0
    summary = run_classify(base, [data], out=tmp_path / "thawed", overrides=small, freeze_steps=2, lm_weight=0.5,
                           baseline=False)
    assert not _gpt_weights_equal(tmp_path / "thawed", base)
    assert summary["options"]["lm_weight"] == 0.5 and summary["options"]["freeze_steps"] == 2


def test_select_on_accuracy_keeps_the_best_val_accuracy_and_scores_val(tmp_path, base_run):
    base, _ = base_run
    data = write_jsonl(tmp_path / "data.jsonl", keyword_examples(300))
    out = tmp_path / "clf"
    summary = run_classify(base, [data], out=out, overrides=TRAIN + ["train.eval_every=10", "train.checkpoint_every=10"],
                           select="accuracy", score_test=False, pooling="meanmax", head_dropout=0.1)
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert all(r["val_loss"] == pytest.approx(1 - r["val_accuracy"]) and "val_nll" in r for r in evals)
    best = max(evals, key=lambda r: (r["val_accuracy"], -r["step"]))  # the first of equally good steps
    assert summary["best_checkpoint"] == f"step-{best['step']:06d}"
    assert summary["scored_split"] == "val" and sum(map(sum, summary["lathe"]["confusion_matrix"])) == summary["counts"]["val"]
    assert summary["lathe"]["accuracy"] == pytest.approx(best["val_accuracy"])  # the kept weights score it again
    with pytest.raises(LatheError, match="select 'f1'"):
        run_classify(base, [data], out=tmp_path / "bad", overrides=TRAIN, select="f1")


def test_paired_comparison_and_exact_mcnemar():
    from scipy.stats import binomtest

    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(2 / 2**10)
    for a, b in ((7, 3), (30, 12), (50, 51)):
        assert mcnemar_p(a, b) == pytest.approx(binomtest(a, a + b, 0.5).pvalue) == mcnemar_p(b, a)
    y = ["p"] * 100
    a = ["p"] * 90 + ["n"] * 10  # wrong on items 90-99
    b = ["n"] * 20 + ["p"] * 80  # wrong on items 0-19: no item is wrong for both
    c = paired_comparison(y, a, b)
    assert c["difference"] == pytest.approx(0.1)
    assert (c["only_a_right"], c["only_b_right"]) == (20, 10)
    assert c["ci_low"] < 0.1 < c["ci_high"]
    assert c["mcnemar_p"] == pytest.approx(binomtest(20, 30, 0.5).pvalue)


def test_body_lr_scale_slows_the_body_and_not_the_head():
    """Adam's first step moves each weight by about lr (lr * g / |g|): the body moves by lr * scale."""
    from lathe.config import TrainConfig
    from lathe.train.loop import make_optimizer, set_lr

    model = tiny_classifier()
    torch.nn.init.normal_(model.head.weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(lr=0.01, weight_decay=0.0)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"), lambda n: 1.0 if n.startswith("head.") else 0.1)
    set_lr(optimizer, 0.01)
    _, lm = model(torch.tensor([[1, 5, 7, 9]]), torch.tensor([4]), lm_loss=True)
    (F.cross_entropy(model(torch.tensor([[1, 5, 7, 9]]), torch.tensor([4])), torch.tensor([1])) + lm).backward()
    optimizer.step()
    head = (model.head.weight - before["head.weight"]).abs().max().item()
    body = (model.gpt.blocks[0].mlp.up_proj.weight - before["gpt.blocks.0.mlp.up_proj.weight"]).abs().max().item()
    assert head == pytest.approx(0.01, rel=0.01) and body == pytest.approx(0.001, rel=0.01)


def test_body_lr_scale_out_of_range_is_a_clear_error(tmp_path, base_run):
    base, _ = base_run
    data = write_jsonl(tmp_path / "data.jsonl", keyword_examples(60))
    with pytest.raises(LatheError, match="body_lr_scale 2.0"):
        run_classify(base, [data], out=tmp_path / "x", overrides=["train.device=cpu"], body_lr_scale=2.0)


def test_channel_readout_scores_each_text_by_its_likelihood_after_the_label():
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=16))
    prefixes = [[7], [8, 9]]
    model = Classifier(gpt, ["a", "b"], "channel", prefixes=prefixes).eval()
    idx, lengths = torch.tensor([[1, 5, 6, 4], [1, 3, 0, 0]]), torch.tensor([4, 2])  # right-padded with 0
    logits = model(idx, lengths)
    for row in range(2):
        text = idx[row, 1 : lengths[row]].tolist()
        for c, prefix in enumerate(prefixes):
            seq = torch.tensor([[1, *prefix, *text]])
            logp = gpt(seq)[0].log_softmax(-1)[0]
            expected = sum(logp[len(prefix) + j, t] for j, t in enumerate(text))
            assert logits[row, c].item() == pytest.approx(expected.item(), abs=1e-4)
    _, nll = model(idx, lengths, lm_loss=True, labels=torch.tensor([1, 0]))
    assert nll.item() == pytest.approx(-(logits[0, 1] + logits[1, 0]).item() / 4, abs=1e-4)


def test_channel_classifier_learns_saves_and_reloads(tmp_path, base_run):
    base, _ = base_run
    data = write_jsonl(tmp_path / "data.jsonl", keyword_examples(600))
    out = tmp_path / "channel"
    summary = run_classify(base, [data], out=out, overrides=TRAIN, pooling="channel", lm_weight=0.5)
    assert summary["lathe"]["accuracy"] >= 0.9, summary["lathe"]
    model = load_classifier(out)
    assert model.pooling == "channel" and model.head.prefixes == summary["prefixes"]


def test_a_run_reloads_at_its_best_val_checkpoint_not_its_latest(tmp_path):
    root = tmp_path / "clf" / "checkpoints"
    best, later = tiny_classifier(), tiny_classifier()
    torch.nn.init.normal_(best.head.weight)
    save_checkpoint(root, 1, best, None, {**classifier_state(best), "best_checkpoint": "step-000001"})
    save_checkpoint(root, 2, later, None, {**classifier_state(later), "best_checkpoint": "step-000001"})
    assert classifier_checkpoint(tmp_path / "clf").name == "step-000001"
    assert torch.equal(load_classifier(tmp_path / "clf").head.weight, best.head.weight)
    assert torch.equal(load_classifier(root / "step-000002").head.weight, later.head.weight)  # a checkpoint as given


def test_weight_average_is_the_mean_of_every_weight_and_needs_one_architecture():
    a, b = tiny_classifier(), tiny_classifier()
    torch.nn.init.normal_(a.head.weight)
    torch.nn.init.normal_(b.gpt.blocks[0].attn.q_proj.weight)
    soup = average_classifiers([a, b])
    assert torch.allclose(soup.head.weight, (a.head.weight + b.head.weight) / 2)
    wq = lambda m: m.gpt.blocks[0].attn.q_proj.weight  # noqa: E731
    assert torch.allclose(wq(soup), (wq(a) + wq(b)) / 2)
    with pytest.raises(LatheError, match="same model config, labels and pooling"):
        average_classifiers([a, tiny_classifier(pooling="last")])


def test_ensemble_averages_member_probabilities_and_scores_like_one_model(tmp_path, base_run):
    base, tok = base_run
    data = write_jsonl(tmp_path / "data.jsonl", keyword_examples(300))
    runs = [tmp_path / f"seed{s}" for s in (1, 2)]
    for seed, out in zip((1, 2), runs):
        run_classify(base, [data], out=out, overrides=TRAIN[:1] + ["train.max_steps=20", f"train.seed={seed}"] + TRAIN[2:],
                     baseline=False, select="accuracy")
    raw = split_labeled([(r["text"], r["label"]) for r in read_jsonl(data)])
    members = [load_classifier(run) for run in runs]
    test = EncodedSplit(tok, raw["test"], members[0].labels, 32)
    mean = np.mean([predict_proba(m, test)[0] for m in members], axis=0)

    summary = score_ensemble(runs, [data], out=tmp_path / "ens")
    assert summary["lathe"]["accuracy"] == pytest.approx(float(np.mean(mean.argmax(-1) == test.labels)))
    assert [m["checkpoint"] for m in summary["members"]] == [classifier_checkpoint(r).name for r in runs]
    assert summary["scored_split"] == "test" and "comparison" in summary
    assert (tmp_path / "ens" / "ensemble_report.md").is_file()
    assert json.loads((tmp_path / "ens" / "ensemble_report.json").read_text())["method"] == "mean"

    soup = score_ensemble(runs, [data], method="soup", score_test=False, baseline=False)
    averaged = average_classifiers(members)
    val = EncodedSplit(tok, raw["val"], members[0].labels, 32)
    assert soup["val_accuracy"] == pytest.approx(float(np.mean(predict(averaged, val)[0] == val.labels)))
    assert soup["scored_split"] == "val" and "baseline" not in soup

    one_checkpoint = classifier_checkpoint(runs[0])  # a member may also be one checkpoint of a run
    assert score_ensemble([one_checkpoint, runs[1]], [data], baseline=False)["lathe"] == summary["lathe"]
    with pytest.raises(LatheError, match="at least 2"):
        score_ensemble(runs[:1], [data])
    with pytest.raises(LatheError, match="method 'vote'"):
        score_ensemble(runs, [data], method="vote")
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "a b c", "label": "zzz"}] * 3 + keyword_examples(60))
    with pytest.raises(LatheError, match="zzz"):
        score_ensemble(runs, [other])

    import argparse

    from lathe.finetune.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "ensemble", *map(str, runs), "--data", data, "--method", "soup",
                              "--val-only", "--out", str(tmp_path / "cli")])
    assert args.handler(args) == 0
    report = json.loads((tmp_path / "cli" / "ensemble_report.json").read_text())
    assert report["val_accuracy"] == pytest.approx(soup["val_accuracy"]) and report["scored_split"] == "val"

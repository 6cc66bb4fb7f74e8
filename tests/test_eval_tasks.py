"""`lathe eval` tasks, the bias probe, the arena and the lm-eval adapter on real tiny models.

Every number is checked against a computation done here by hand from the model's own outputs: a
plain full-sequence forward pass, log-softmax and sums, independent of the batching, padding and
KV cache of the code under test."""

import json
import math

import numpy as np
import pytest
import torch
from sacrebleu.metrics import BLEU, CHRF

from lathe.cli import main
from lathe.config import ModelConfig, TokenizerConfig, TrainConfig
from lathe.errors import LatheError
from lathe.eval import arena, tasks
from lathe.eval.bias import bias_probe
from lathe.eval.loglik import complete, encode_pair, prompt_ids, score_continuations
from lathe.eval.metrics import extract_gsm8k_answer, win_rate
from lathe.model import GPT
from lathe.tokenizer import train_tokenizer
from lathe.train.batches import random_windows
from lathe.train.checkpoint import save_checkpoint
from lathe.train.loop import train
from lathe.verify import get_verifier

DOCS = [f"{a}+{b}={a + b}\nQuestion: What is {a} plus {b}?\nAnswer: {a} plus {b} makes {a + b}. #### {a + b}\n"
        for a in range(10) for b in range(10)]
MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS, TokenizerConfig(vocab_size=300, min_frequency=1))


def make_run(path, tok, steps: int, seed: int):
    """A run directory: tokenizer.json + checkpoints of a GPT trained `steps` steps (0: its initial weights)."""
    tok.save(path / "tokenizer.json")
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, **MODEL))
    if steps == 0:
        save_checkpoint(path / "checkpoints", 0, model, None, {})
        return model.eval()
    ids = np.array([t for d in DOCS for t in [tok.bos_id, *tok.encode(d)]])
    cfg = TrainConfig(max_steps=steps, batch_size=16, lr=1e-2, warmup_steps=10, eval_every=10**6,
                      checkpoint_every=10**6, log_every=10, device="cpu", seed=seed)
    train(model, cfg, random_windows(ids, MODEL["block_size"], 16, seed), None, path)
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("trained")
    return path, make_run(path, tok, steps=120, seed=1)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("untrained")
    return path, make_run(path, tok, steps=0, seed=2)


# --- by-hand references -------------------------------------------------------------------------------
@torch.no_grad()
def manual_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log P(ids[t] | ids[:t]) for t >= 1, from one plain forward pass."""
    logits, _ = model(torch.tensor([ids[:-1]]))
    return logits[0].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def manual_continuation(model, ctx: list[int], cont: list[int]) -> float:
    return float(manual_logprobs(model, ctx + cont)[-len(cont):].sum())


@torch.no_grad()
def manual_greedy(model, tok, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step (no KV cache)."""
    out = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids + out]))[0][0, -1].argmax())
        if nxt in (tok.eos_id, tok.bos_id):
            break
        out.append(nxt)
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- scoring --------------------------------------------------------------------------------------------
def test_score_continuations_equal_manual_sums(trained, tok):
    _, model = trained
    texts = [("3+4=", "7"), ("Question: What is 2 plus 2?\nAnswer:", " 2 plus 2 makes 4. #### 4"),
             ("", "1+1=2"), ("9+9=", "18\nQuestion")]
    pairs = [encode_pair(tok, c, x) for c, x in texts]
    for batch_size in (1, 3):  # padding inside a batch must not change a score
        scored = score_continuations(model, pairs, batch_size=batch_size)
        for (ctx, cont), s in zip(pairs, scored):
            assert s.tokens == len(cont)
            assert s.logprob == pytest.approx(manual_continuation(model, ctx, cont), abs=1e-4)
            greedy = manual_greedy(model, tok, ctx, len(cont)) == cont
            assert s.greedy == greedy
    # a context longer than the block is cut from the left: the last block_size + 1 tokens count
    ctx, cont = prompt_ids(tok, DOCS[5] + DOCS[6]), tok.encode("7+1=8")
    row = (ctx + cont)[-(MODEL["block_size"] + 1):]
    [s] = score_continuations(model, [(ctx, cont)])
    assert len(ctx) > MODEL["block_size"]
    assert s.logprob == pytest.approx(float(manual_logprobs(model, row)[-len(cont):].sum()), abs=1e-4)


def test_encode_pair_moves_trailing_space(tok):
    ctx, cont = encode_pair(tok, "Answer: ", "4")
    assert ctx == prompt_ids(tok, "Answer:") and cont == tok.encode(" 4")


def test_greedy_completion_equals_manual_decoding(trained, tok):
    _, model = trained
    ids = prompt_ids(tok, "Question: What is 6 plus 1?\nAnswer:")
    expected = tok.decode(manual_greedy(model, tok, ids, 20))
    assert complete(model, tok, ids, 20) == expected
    cut = expected.index("####") if "####" in expected else len(expected) // 2
    assert complete(model, tok, ids, 20, until=[expected[cut:cut + 2]]) == expected[:cut]


# --- tasks ------------------------------------------------------------------------------------------------
def test_text_perplexity_and_bits_per_byte(trained, tok, tmp_path):
    _, model = trained
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("2+3=5\nQuestion: What is 2 plus 3?\n")
    files[1].write_text("Answer: 4 plus 4 makes 8. #### 8 — café\n")  # multi-byte characters count as bytes
    summary, per_file = tasks.eval_text(model, tok, files, max_tokens=10_000)
    nats = [float(-manual_logprobs(model, prompt_ids(tok, f.read_text())).sum()) for f in files]
    counts = [len(tok.encode(f.read_text())) for f in files]
    n_bytes = [len(f.read_text().encode("utf-8")) for f in files]
    for r, n, c, b in zip(per_file, nats, counts, n_bytes):
        assert r["tokens"] == c and r["bytes"] == b
        assert r["loss"] == pytest.approx(n / c, rel=1e-4)
        assert r["bpb"] == pytest.approx(n / math.log(2) / b, rel=1e-4)
    m = summary["metrics"]
    assert m["loss"] == pytest.approx(sum(nats) / sum(counts), rel=1e-4)
    assert m["ppl"] == pytest.approx(math.exp(sum(nats) / sum(counts)), rel=1e-4)
    assert m["bpb"] == pytest.approx(sum(nats) / math.log(2) / sum(n_bytes), rel=1e-4)


def test_multiple_choice_by_loglikelihood(trained, tok, tmp_path):
    _, model = trained
    rows = [{"question": "3+4=", "options": ["7", "11", "1234"], "answer": 0},
            {"question": "Question: What is 5 plus 5?\nAnswer:", "options": ["5 plus 5 makes 10. #### 10", "no"],
             "answer": 0},
            {"question": "1+1=", "options": ["2", "22", "x"], "answer": 2}]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    summary, examples = tasks.eval_mc(model, tok, tasks.read_mc(data))
    hits = hits_norm = 0
    for row, ex in zip(rows, examples):
        manual = [manual_continuation(model, *encode_pair(tok, row["question"], " " + o)) for o in row["options"]]
        assert ex["logprobs"] == pytest.approx(manual, abs=1e-4)
        per_byte = [lp / len((" " + o).encode()) for lp, o in zip(manual, row["options"])]
        hits += int(np.argmax(manual)) == row["answer"]
        hits_norm += int(np.argmax(per_byte)) == row["answer"]
    assert summary["metrics"]["accuracy"] == hits / 3
    assert summary["metrics"]["accuracy_norm"] == hits_norm / 3
    assert summary["metrics"]["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)


def test_gsm8k_exact_match_on_the_models_own_answers(trained, tok, tmp_path):
    _, model = trained
    questions = [(2, 3), (4, 4), (7, 1), (0, 6)]
    outputs = []
    for a, b in questions:  # what the model really answers, decoded by hand, cut at the plain format's end
        ids = prompt_ids(tok, f"Question: What is {a} plus {b}?\nAnswer:")
        outputs.append(tok.decode(manual_greedy(model, tok, ids, 40)).split("\nQuestion:")[0])
    predicted = [extract_gsm8k_answer(o) for o in outputs]
    assert sum(p is not None for p in predicted) >= 2, outputs  # the tiny model learned the format
    # gold answers: the model's own for the first two questions, one more than it for the rest
    golds = [p if i < 2 else str(int(p or 0) + 1) for i, p in enumerate(predicted)]
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {g}. #### {g}"}
            for (a, b), g in zip(questions, golds)]
    data = write_jsonl(tmp_path / "gsm.jsonl", rows)
    summary, examples = tasks.eval_gsm8k(model, tok, tasks.read_gsm8k(data), max_tokens=40)
    assert [e["prediction"] for e in examples] == outputs
    hits = sum(p is not None and p == g for p, g in zip(predicted, golds))
    assert summary["metrics"]["exact_match"] == hits / 4 and hits >= 1
    assert summary["metrics"]["well_formed"] == sum(p is not None for p in predicted) / 4


def test_gsm8k_chat_prompt_uses_the_chat_template(trained, tok):
    from lathe.chat import render_chat

    _, model = trained
    rows = [{"question": "What is 1 plus 2?", "answer": "#### 3"}]
    _, [ex] = tasks.eval_gsm8k(model, tok, rows, chat=True, max_tokens=12)
    ids, _ = render_chat(tok, [{"role": "user", "content": "What is 1 plus 2?"}], add_generation_prompt=True)
    stop = {tok.special_id("<|assistant_end|>"), tok.eos_id, tok.bos_id}
    out = []
    for t in manual_greedy(model, tok, ids, 12):
        if t in stop:
            break
        out.append(t)
    assert ex["prediction"] == tok.decode(out)


def test_classification_metrics_from_a_predictions_file(tmp_path):
    rows = [("pos", "pos"), ("pos", "pos"), ("pos", "neg"), ("neg", "neg"), ("neg", "pos"), ("neu", "neu")]
    data = write_jsonl(tmp_path / "pred.jsonl", [{"label": t, "prediction": p} for t, p in rows])
    summary, _ = tasks.eval_classify(tasks.read_classify(data), data=data)
    m = summary["metrics"]
    # by hand: neg P=1/2 R=1/2; neu P=1 R=1; pos P=2/3 R=2/3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_precision"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert m["macro_f1"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert m["weighted_recall"] == pytest.approx((2 * 1 / 2 + 1 * 1 + 3 * 2 / 3) / 6)
    assert summary["labels"] == ["neg", "neu", "pos"]
    assert summary["confusion_matrix"] == [[1, 0, 1], [0, 1, 0], [1, 0, 2]]


def test_translation_bleu_and_chrf(trained, tok, tmp_path):
    _, model = trained
    refs = ["2 plus 2 makes 4 .", "3 plus 5 makes 8 ."]
    given = write_jsonl(tmp_path / "given.jsonl", [
        {"source": "2+2", "reference": refs[0], "hypothesis": "2 plus 2 makes 4 ."},
        {"source": "3+5", "reference": [refs[1], "three plus five is eight ."], "hypothesis": "3 plus 5 is 8 ."}])
    summary, _ = tasks.eval_translate(None, None, tasks.read_translate(given), data=given)
    hyps, streams = ["2 plus 2 makes 4 .", "3 plus 5 is 8 ."], [refs, [None, "three plus five is eight ."]]
    assert summary["metrics"]["bleu"] == pytest.approx(BLEU().corpus_score(hyps, streams).score)
    assert summary["metrics"]["chrf"] == pytest.approx(CHRF().corpus_score(hyps, streams).score)
    # the model translating: scored on what it actually wrote (its first line, by hand)
    data = write_jsonl(tmp_path / "mt.jsonl", [{"source": "2+2", "reference": refs[0]}])
    summary, [ex] = tasks.eval_translate(model, tok, tasks.read_translate(data), max_tokens=16)
    ids = prompt_ids(tok, "Source: 2+2\nTranslation:")
    written = tok.decode(manual_greedy(model, tok, ids, 16)).split("\n")[0].strip()
    assert ex["hypothesis"] == written
    assert summary["metrics"]["chrf"] == pytest.approx(CHRF().corpus_score([written], [[refs[0]]]).score)


def test_bad_rows_name_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "options": ["a", "b"], "answer": 1},
                                              {"question": "q", "options": ["a", "b"], "answer": 2}])
    with pytest.raises(LatheError, match=r"mc.jsonl:2: field 'answer'"):
        tasks.read_mc(bad)
    (tmp_path / "g.jsonl").write_text('{"question": "q", "answer": "12"}\n')
    with pytest.raises(LatheError, match=r"g.jsonl:1: .*####"):
        tasks.read_gsm8k(tmp_path / "g.jsonl")
    (tmp_path / "c.jsonl").write_text('{"label": "a", "prediction": "a"}\n{"label": "b"}\n')
    with pytest.raises(LatheError, match=r"c.jsonl:2: field 'prediction'"):
        tasks.read_classify(tmp_path / "c.jsonl")


# --- bias probe -----------------------------------------------------------------------------------------
def test_bias_table_equals_manual_loglikelihoods(trained, tok):
    _, model = trained
    templates = ["The {group} was a skilled doctor.", "Everyone thanked the {group} for the help."]
    groups = {"gender": ["man", "woman"], "numbers": ["7 person", "3 person", "11 person"]}
    result = bias_probe(model, tok, templates, groups)
    for name, terms in groups.items():
        s = result["sets"][name]
        manual = np.array([[manual_continuation(model, prompt_ids(tok, t.split("{group}")[0] + g),
                                                tok.encode(t.split("{group}")[1])) for g in terms]
                           for t in templates])
        assert np.allclose(s["logprob"], manual, atol=1e-4)
        diff = manual - manual.mean(axis=1, keepdims=True)
        assert np.allclose(s["diff"], diff, atol=1e-4)
        assert np.allclose(s["mean_diff"], diff.mean(axis=0), atol=1e-4)
        assert s["spread"] == pytest.approx(diff.mean(axis=0).max() - diff.mean(axis=0).min(), abs=1e-4)
    assert np.array(result["sets"]["numbers"]["diff"]).shape == (2, 3)


# --- arena --------------------------------------------------------------------------------------------------
def contestants(trained, untrained, tok):
    return arena.Contestant("trained", trained[1], tok), arena.Contestant("untrained", untrained[1], tok)


def test_arena_same_model_ties_everywhere(trained, tok):
    a = arena.Contestant("a", trained[1], tok)
    summary, rows = arena.run_arena(a, a, arena.task_prompts("addition", 4, seed=0), verifier="addition",
                                    max_tokens=6, stop=["\n"])
    assert summary["ties"] == 4 and summary["wins"] == summary["losses"] == 0
    assert summary["win_rate"] == win_rate(0, 0, 4)
    assert all(r["answer_a"] == r["answer_b"] for r in rows)


def test_arena_verifier_counts_and_win_rate(trained, untrained, tok):
    a, b = contestants(trained, untrained, tok)
    prompts = [f"{x}+{y}=" for x, y in [(1, 2), (3, 4), (5, 1), (2, 2), (8, 1)]]
    answers = [complete(a.model, tok, prompt_ids(tok, p), 6, ["\n"]) for p in prompts]
    # expected answers: A's own on the first three prompts (A wins there unless B says the same), 99 elsewhere
    items = [{"prompt": p, "answer": a.strip() if i < 3 else "99"} for i, (p, a) in enumerate(zip(prompts, answers))]
    summary, rows = arena.run_arena(a, b, items, verifier="addition", max_tokens=6, stop=["\n"])
    check = get_verifier("addition")
    wins = losses = ties = 0
    for item, row in zip(items, rows):
        assert row["answer_a"] == complete(a.model, tok, prompt_ids(tok, item["prompt"]), 6, ["\n"])
        assert row["answer_b"] == complete(b.model, tok, prompt_ids(tok, item["prompt"]), 6, ["\n"])
        sa = check(item["prompt"], row["answer_a"], expected=item["answer"]).score
        sb = check(item["prompt"], row["answer_b"], expected=item["answer"]).score
        wins, losses, ties = wins + (sa > sb), losses + (sb > sa), ties + (sa == sb)
        assert row["winner"] == ("a" if sa > sb else "b" if sb > sa else "tie")
    assert (summary["wins"], summary["losses"], summary["ties"]) == (wins, losses, ties)
    assert wins >= 1, rows  # the trained model answers in numbers; the untrained one does not
    assert summary["win_rate"] == win_rate(wins, losses, ties)


def test_arena_judge_model_prefers_the_likelier_answer(trained, untrained, tok):
    a, b = contestants(trained, untrained, tok)
    judge = arena.Contestant("judge", trained[1], tok)
    items = [{"prompt": p} for p in ["Question: What is 1 plus 3?\nAnswer:", "4+4=", "6+2="]]
    summary, rows = arena.run_arena(a, b, items, judge=judge, max_tokens=8)
    wins = losses = 0
    for item, row in zip(items, rows):
        def per_token(answer):
            ctx, cont = encode_pair(tok, item["prompt"], answer)
            return manual_continuation(judge.model, ctx, cont) / len(cont) if cont else -math.inf
        sa, sb = per_token(row["answer_a"]), per_token(row["answer_b"])
        assert row["score_a"] == pytest.approx(sa, abs=1e-4) and row["score_b"] == pytest.approx(sb, abs=1e-4)
        wins, losses = wins + (sa > sb), losses + (sb > sa)
    assert (summary["wins"], summary["losses"]) == (wins, losses)
    assert summary["win_rate"]["rate"] == pytest.approx((wins + 0.5 * (3 - wins - losses)) / 3)


# --- lm-evaluation-harness adapter -----------------------------------------------------------------------------
def test_harness_adapter_matches_lathe(trained, tok):
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install lm-eval")
    from lm_eval.api.instance import Instance

    from lathe.eval.harness import LatheLM

    _, model = trained
    lm = LatheLM(model=model, tokenizer=tok, batch_size=2)

    def req(kind, *args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    pairs = [("3+4=", "7"), ("Question: What is 2 plus 2?\nAnswer: ", "2 plus 2 makes 4")]
    results = lm.loglikelihood([req("loglikelihood", *p) for p in pairs])
    for (ctx, cont), (logprob, greedy) in zip(pairs, results):
        c, x = encode_pair(tok, ctx, cont)
        assert logprob == pytest.approx(manual_continuation(model, c, x), abs=1e-4)
        assert greedy == (manual_greedy(model, tok, c, len(x)) == x)

    short, long = DOCS[3], DOCS[3] + DOCS[4] + DOCS[5]
    ids = tok.encode(long)
    block = MODEL["block_size"]
    assert block < len(ids) <= 2 * block
    # by hand: the first window predicts ids[:block] after <|bos|>; the second predicts the rest with
    # the longest context that fits (the block_size tokens before each target)
    first = float(manual_logprobs(model, [tok.bos_id] + ids[:block]).sum())
    second = float(manual_logprobs(model, ids[len(ids) - block - 1:])[-(len(ids) - block):].sum())
    rolling = lm.loglikelihood_rolling([req("loglikelihood_rolling", short), req("loglikelihood_rolling", long)])
    assert rolling[0] == pytest.approx(float(manual_logprobs(model, prompt_ids(tok, short)).sum()), abs=1e-3)
    assert rolling[1] == pytest.approx(first + second, abs=1e-3)

    context = "Question: What is 5 plus 3?\nAnswer:"
    free = tok.decode(manual_greedy(model, tok, prompt_ids(tok, context), 24))
    stop = free[len(free) // 2: len(free) // 2 + 2]
    out = lm.generate_until([req("generate_until", context, {"until": [stop], "max_gen_toks": 24}),
                             req("generate_until", context, {"until": ["never"], "max_gen_toks": 24})])
    assert out == [free[: free.index(stop)], free]


# --- the CLI ---------------------------------------------------------------------------------------------------------
def test_cli_eval_task_and_arena_write_results(trained, untrained, tok, tmp_path, capsys):
    run, _ = trained
    data = write_jsonl(tmp_path / "quiz.jsonl", [{"question": "2+2=", "options": ["4", "5"], "answer": 0}])
    assert main(["eval", "--run", str(run), "--task", "mc", "--data", str(data), "--device", "cpu"]) == 0
    result = json.loads((run / "eval" / "mc-quiz.json").read_text())
    assert result["task"] == "mc" and result["n"] == 1
    assert not (run / "recipe.yaml").exists()  # task evaluation leaves the run's recipe alone

    assert main(["arena", "--a", str(run), "--b", str(untrained[0]), "--task", "addition", "--n", "3",
                 "--max-tokens", "5", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((run / "eval" / f"arena-{untrained[0].name}.json").read_text())
    assert saved["n"] == summary["n"] == 3 and saved["options"]["verifier"] == "addition"
    assert len((run / "eval" / f"arena-{untrained[0].name}.jsonl").read_text().splitlines()) == 3

    assert main(["eval", "--run", str(run), "--task", "mc", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err


def test_harness_runs_an_lm_eval_task_on_local_data(trained, tok, tmp_path, monkeypatch):
    """lm-eval's own evaluator, on a task defined over a local file, agrees with `lathe eval --task mc`."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install lm-eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lathe.eval.harness import LatheLM, run_harness

    _, model = trained
    rows = [{"question": f"{a}+{b}=", "options": [str(a + b), str(a + b + 3), str(a * b + 1)], "answer": 0}
            for a in range(4) for b in range(3)]
    data = write_jsonl(tmp_path / "sums.jsonl", rows)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "sums.yaml").write_text(
        f"task: lathe_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {tmp_path / 'cache'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{options}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    result = run_harness(LatheLM(model=model, tokenizer=tok), ["lathe_sums"], include_path=str(tmp_path / "tasks"),
                         include_defaults=False)
    ours, _ = tasks.eval_mc(model, tok, tasks.read_mc(data))
    assert result["n"] == len(rows)
    assert result["metrics"]["lathe_sums/acc"] == pytest.approx(ours["metrics"]["accuracy"])
    assert result["metrics"]["lathe_sums/acc_norm"] == pytest.approx(ours["metrics"]["accuracy_norm"])
    assert 0 < ours["metrics"]["accuracy"] < 1  # a set where the two could disagree


def test_classify_runs_the_runs_classifier_on_texts(trained, tok, tmp_path):
    from lathe.finetune.classify import Classifier

    torch.manual_seed(3)
    clf = Classifier(GPT(trained[1].cfg), ["neg", "pos"])
    torch.nn.init.normal_(clf.head.weight, std=1.0)  # a head that says something
    run = tmp_path / "clf"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    save_checkpoint(run / "checkpoints", 0, clf, None, {"labels": clf.labels, "pooling": clf.pooling})
    texts = ["3+4=7", "Question: What is 1 plus 1?", "9+9=18\n", "Answer: #### 5", "0+0=0", "2 plus 2"]
    labels = ["pos", "neg", "pos", "pos", "neg", "neg"]
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t, "label": lb} for t, lb in zip(texts, labels)])
    assert main(["eval", "--run", str(run), "--task", "classify", "--data", str(data), "--device", "cpu"]) == 0
    result = json.loads((run / "eval" / "classify-texts.json").read_text())
    with torch.no_grad():  # by hand: one text at a time, the head on its last token
        predicted = [clf.labels[int(clf(torch.tensor([prompt_ids(tok, t)]), torch.tensor([len(prompt_ids(tok, t))]))
                                    .argmax())] for t in texts]
    assert result["metrics"]["accuracy"] == pytest.approx(sum(p == t for p, t in zip(predicted, labels)) / 6)
    pairs = list(zip(labels, predicted))
    matrix = [[sum(t == a and p == b for t, p in pairs) for b in ("neg", "pos")] for a in ("neg", "pos")]
    assert result["confusion_matrix"] == matrix

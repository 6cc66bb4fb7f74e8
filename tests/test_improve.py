"""The improve loop's pieces: config, gate, batched decoding, the data folders, the father proposer, tune changes."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lathe.config import ModelConfig
from lathe.errors import LatheError
from lathe.generate import stream_ids
from lathe.improve.config import ImproveConfig, load_improve_config
from lathe.improve.data import (ImproveRun, check_originals, ingest_inbox, load_originals, mix_batches,
                               write_round)
from lathe.improve.decode import complete
from lathe.improve.gate import decide
from lathe.improve.propose import written_prompts
from lathe.improve.loop import (Arm, State, Workshop, _should_stop, drop_mastered, phase_gate, phase_propose,
                                phase_verify, setup_run)
from lathe.improve.tune import apply_change
from lathe.io import read_jsonl, write_json
from lathe.model import GPT


# --- config -----------------------------------------------------------------------------------
def test_configs_layer_over_the_defaults_and_typos_name_the_field():
    demo = load_improve_config("improve")
    assert demo.task.answer_order == "reversed" and demo.train.max_steps == 1000
    assert demo.train.weight_decay == ImproveConfig().train.weight_decay  # a partial section keeps the rest
    tiny = load_improve_config("improve-tiny", ["retrain.max_steps=7"])
    assert tiny.retrain.max_steps == 7 and tiny.task.options == {"digits": 2}
    assert load_improve_config(None, ["task.kind=sorting"]).task.kind == "sorting"
    with pytest.raises(LatheError, match="propose.temprature"):
        load_improve_config("improve", ["propose.temprature=1"])
    with pytest.raises(LatheError, match="reversed"):
        load_improve_config("improve", ["task.kind=sorting", "task.answer_order=reversed"])


# --- the gate ---------------------------------------------------------------------------------
def test_gate_promotes_only_beyond_noise():
    champion = [1] * 50 + [0] * 150
    clear = [1] * 90 + [0] * 110  # +20 points on the same items: far beyond noise
    d = decide(clear, champion)
    assert d.promote and d.gain == pytest.approx(0.2) and "promoted" in d.reason
    # +1.5 points, the rest a reshuffle of which items are right: noise, not progress
    shuffled = [0] * 10 + [1] * 53 + [0] * 137
    d = decide(shuffled, champion)
    assert not d.promote and "within noise" in d.reason and d.gain > 0
    worse = [1] * 30 + [0] * 170
    d = decide(worse, champion)
    assert not d.promote and "no gain" in d.reason
    # a run-to-run spread larger than the gain keeps the champion even when items alone would not
    assert decide(clear, champion, run_noise=0.0).promote
    assert not decide(clear, champion, run_noise=0.15).promote
    assert not decide(champion, champion).promote  # identical models: never a promotion


# --- batched decoding -------------------------------------------------------------------------
def tiny_model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()


def test_batched_greedy_matches_one_prompt_at_a_time():
    model = tiny_model()
    prompts = [[1, 5, 7], [1, 9, 9, 9, 9, 3, 2], [1, 4], [1, 8, 8, 8, 2]]  # different lengths: left padding
    batched = complete(model, prompts, 6, stop_ids={0}, chunk=3)
    for p, [got] in zip(prompts, batched):
        want = []
        for step in stream_ids(model, p, 6, temperature=0):
            if step[0] is None or step[0] == 0:
                break
            want.append(step[0])
        assert got == want


def test_sampling_k_per_prompt_is_seeded():
    model = tiny_model()
    prompts = [[1, 5, 7], [1, 2]]
    a = complete(model, prompts, 8, k=5, temperature=1.0, seed=3)
    assert len(a) == 2 and all(len(samples) == 5 for samples in a)
    assert a == complete(model, prompts, 8, k=5, temperature=1.0, seed=3)
    assert len({tuple(s) for s in a[0]}) > 1  # k samples differ


# --- data folders -----------------------------------------------------------------------------
def tiny_cfg(**over) -> ImproveConfig:
    return load_improve_config("improve-tiny", [f"{k}={v}" for k, v in over.items()])


def test_originals_are_checked_and_the_inbox_joins_them_once(tmp_path):
    run, cfg = ImproveRun(tmp_path / "r"), tiny_cfg()
    setup_run(run, cfg)
    n = len(load_originals(run))
    assert n == sum(s.size for s in cfg.task.seed_sets)
    run.inbox.mkdir()
    (run.inbox / "mine.jsonl").write_text('{"prompt": "2+2=", "answer": "4"}\n{"prompt": "3+3=", "answer": "6"}\n')
    (added,) = ingest_inbox(run, 3)
    assert not (run.inbox / "mine.jsonl").exists() and len(load_originals(run)) == n + 2
    # the same file dropped again (a kill after the copy, before the delete) is not added twice
    (run.inbox / "again.jsonl").write_bytes((run.orig / added).read_bytes())
    assert ingest_inbox(run, 4) == [] and len(load_originals(run)) == n + 2
    (run.inbox / "bad.jsonl").write_text('{"prompt": "1+1="}\n')
    with pytest.raises(LatheError, match="bad.jsonl:1"):
        ingest_inbox(run, 5)
    seed = run.orig / "seed.jsonl"
    seed.write_text(seed.read_text().replace("=", " = ", 1))
    with pytest.raises(LatheError, match="seed.jsonl changed"):
        check_originals(run)


def test_mix_batches_are_a_pure_function_of_the_index_and_honor_the_share():
    orig = [([0, 1, 2, 3], 2)] * 10
    rework = [([0, 1, 2, 9, 9], 3)] * 10
    get = mix_batches(orig, rework, 400, seed=1, rework_share=0.9, pad_id=5)
    x, y, mask = get(3)
    assert torch.equal(x, get(3)[0]) and not torch.equal(x, get(4)[0])
    share = (x[:, 3] == 9).float().mean().item()  # rework rows are the longer ones
    assert 0.85 < share < 0.95
    # only answer targets (and the closing token) are learned; padding never
    assert mask[x[:, 3] != 9].sum(1).eq(2).all() and mask[x[:, 3] == 9].sum(1).eq(2).all()


# --- the father: a stronger proposer behind an OpenAI-compatible endpoint ------------------------
class FatherHandler(BaseHTTPRequestHandler):
    """A minimal /v1/chat/completions: sums right when the first operand is even, off by one when odd;
    asked for new tasks it writes two well-formed ones and one malformed."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions" and body["model"] == "dad"
        question = body["messages"][-1]["content"]
        if question.startswith("Here are tasks"):
            texts = ["11+22=\n40+2=\nplease add"]
        elif "+" not in question:
            texts = ["what?"] * body.get("n", 1)
        else:
            a, b = (int(x) for x in question.rstrip("=").split("+"))
            texts = [str(a + b + (a % 2))] * body.get("n", 1)
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": "dad",
                 "choices": [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": t}}
                             for i, t in enumerate(texts)]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def father_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FatherHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_father_proposes_and_the_verifier_keeps_only_right_answers(tmp_path, father_url):
    cfg = tiny_cfg(**{"propose.father_url": father_url, "propose.father_model": "dad",
                      "propose.prompts_per_round": 12, "propose.samples_per_prompt": 2, "propose.father_new_tasks": 3})
    run = ImproveRun(tmp_path / "r")
    setup_run(run, cfg)
    arm = Arm("loop", run, cfg, state=State(round=1))
    ws = Workshop(run, cfg)
    phase_propose(ws, arm, 1)
    candidates = read_jsonl(run.work(1) / "candidates.jsonl")
    assert len(candidates) == (12 + 3) * 2
    assert all(c["model"] == f"father dad at {father_url}" for c in candidates)
    assert sum(c["source"] == "father:new-task" for c in candidates) == 6
    phase_verify(ws, arm, 1)
    verdicts = read_jsonl(run.work(1) / "verdicts.jsonl")
    for v in verdicts:
        if v["prompt"] == "please add":
            assert not v["kept"] and v["rejected_by"] == "malformed prompt"
            continue
        a, b = (int(x) for x in v["prompt"].rstrip("=").split("+"))
        if a % 2:
            assert not v["kept"] and v["rejected_by"] == "verifier:addition"
    kept = [v for v in verdicts if v["kept"]]
    assert kept and all(v["verifier"] == "addition" for v in kept)
    # the two identical samples of each prompt: the second is a duplicate
    assert sum(v["rejected_by"] == "filter:dedup" for v in verdicts if not v["kept"]) >= len(kept)


def test_drop_mastered_keeps_only_the_frontier():
    def verdict(prompt, kept, rejected_by=None):
        return {"prompt": prompt, "kept": kept, "rejected_by": rejected_by}

    verdicts = [verdict("1+1=", True), verdict("1+1=", False, "filter:dedup"),  # both right: mastered
                verdict("9+9=", True), verdict("9+9=", False, "verifier:addition"),  # one of two: the frontier
                verdict("5+5=", True)]  # a single sample says nothing about mastery
    drop_mastered(verdicts)
    assert [v["kept"] for v in verdicts] == [False, False, True, False, True]
    assert verdicts[0]["rejected_by"] == "filter:mastered" and "all 2 samples right" in verdicts[0]["reason"]
    assert verdicts[1]["rejected_by"] == "filter:dedup"


def test_collapse_guard_refuses_a_better_candidate_whose_perplexity_blew_up_and_stops_the_loop(tmp_path):
    cfg = load_improve_config("improve-tiny", ["gate.collapse_ppl_ratio=2.0"])
    run = ImproveRun(tmp_path / "c")
    correct = {0: [0] * 50 + [1] * 50, 1: [1] * 100}  # the candidate answers every held-out item right...
    for r, ppl in ((0, 1.5), (1, 3.5)):  # ...but its held-out perplexity is 3.5 > 2 x the base's 1.5
        write_json(run.work(r) / "eval.json", {"accuracy": sum(correct[r]) / 100, "correct": correct[r], "ppl": ppl})
    write_round(run, 1, [], {"round": 1, "candidates": 0, "kept": 0, "rejected": 0, "rejected_by": {}})
    arm = Arm("loop", run, cfg, state=State(round=1, base_ppl=1.5))
    phase_gate(None, arm, 1)
    row = read_jsonl(run.rounds)[0]
    assert not row["promoted"] and row["champion"] == 0 and row["reason"].startswith("collapse")
    assert arm.state.champion == 0 and "collapse" in arm.state.stopped
    assert _should_stop(run, arm, cfg, 2)


def test_prompts_the_model_writes_are_cut_at_the_prompt_end_and_never_held_out():
    texts = ["12+34=64", "12+34=46", "5+5=01", "99+1=", "no end", "=7", "7+7=41"]
    assert written_prompts(texts, exclude={"7+7="}) == ["12+34=", "5+5=", "99+1="]


# --- tune changes -----------------------------------------------------------------------------
def test_tune_changes_apply_and_bad_ones_fail_clearly():
    cfg = ImproveConfig()
    assert apply_change(cfg, "lr*2").train.lr == pytest.approx(2 * cfg.train.lr)
    assert apply_change(cfg, "lr*2").retrain.lr == pytest.approx(2 * cfg.retrain.lr)
    assert apply_change(cfg, "width*2").model.n_embd == 2 * cfg.model.n_embd
    assert isinstance(apply_change(cfg, "width*2").model.n_embd, int)
    assert apply_change(cfg, "depth+1").model.n_layer == cfg.model.n_layer + 1
    assert apply_change(cfg, "schedule=wsd").train.schedule == "wsd"
    assert apply_change(cfg, "train.weight_decay=0").train.weight_decay == 0
    with pytest.raises(LatheError, match="n_embd"):
        apply_change(cfg, "width=30")  # not divisible by the heads
    with pytest.raises(LatheError, match="unknown field"):
        apply_change(cfg, "train.lerning_rate=1")
    with pytest.raises(LatheError, match="numeric"):
        apply_change(cfg, "schedule*2")

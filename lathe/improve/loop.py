"""The improve loop: a model that improves itself with no human in the loop.

Round 0 trains a base model on the originals. Every later round:
  inbox       (--forever) new files in inbox/ join the originals
  propose     the champion answers fresh prompts k times (or a father model does)
  verify      a verifier and filters judge every candidate, with a reason
  accumulate  kept samples go to data/rework/round-N/, beside the untouched originals
  retrain     the champion (or the base) trains on originals + every kept round
  evaluate    held-out accuracy (greedy) and held-out perplexity of the original data
  gate        promote the candidate only if it beats the champion beyond noise; else roll back
Each phase writes its output under a temporary name and renames it into place, then state.json
records the phase as finished. A kill anywhere resumes at the first unfinished phase, which simply
runs again: nothing is lost or written twice.

Two control arms run beside the loop, each in controls/<arm>/ with the same base, budgets and gate:
  no-loop   the same extra training steps on the originals only, nothing proposed
  keep-all  the loop with every sample kept (no verifier; filters still apply)
"""

from __future__ import annotations

import ctypes
import json
import math
import multiprocessing
import os
import resource
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field

import torch

from lathe.console import info
from lathe.errors import LatheError
from lathe.improve.config import ImproveConfig, dump_config
from lathe.improve.data import (ImproveRun, check_originals, encode_example, ingest_inbox, load_originals,
                                load_rework, mix_batches, pad_rows, read_examples, write_jsonl, write_originals,
                                write_round)
from lathe.improve.gate import decide, run_spread
from lathe.improve.decode import complete
from lathe.improve.propose import Father, choose_prompts, make_tasks, written_prompts
from lathe.improve.report import write_report
from lathe.io import read_json, read_jsonl, write_json, write_text
from lathe.model import GPT
from lathe.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from lathe.train.checkpoint import latest_checkpoint, load_model, load_weights
from lathe.train.dist import pick_device
from lathe.train.loop import train
from lathe.verify import get_filter, get_verifier

ROUND_PHASES = ("inbox", "propose", "verify", "accumulate", "retrain", "evaluate", "gate")
DIE_AT = "LATHE_IMPROVE_DIE_AT"  # test hook: "arm:round:phase" or "arm:round:retrain@batch" -> SIGKILL there


@dataclass
class State:
    round: int = 0  # the round in progress
    phase: str = ""  # its last finished phase ("" = none yet)
    champion: int = 0  # the round whose model is the champion
    stopped: str | None = None  # set when the loop must not go on (collapse)
    base_ppl: float | None = None
    run_noise: float = 0.0
    round_seconds: float = 0.0  # time spent in the round's finished phases (across resumes)

    @classmethod
    def load(cls, run: ImproveRun) -> "State | None":
        return cls(**read_json(run.state)) if run.state.exists() else None

    def save(self, run: ImproveRun) -> None:
        write_json(run.state, asdict(self))


@dataclass
class Arm:
    name: str  # "loop", "keep-all", "no-loop"
    run: ImproveRun
    cfg: ImproveConfig
    proposes: bool = True
    state: State = field(default_factory=State)


def _die_if(point: str) -> None:
    if os.environ.get(DIE_AT) == point:
        os.kill(os.getpid(), signal.SIGKILL)


# --- shared pieces: the task's data, tokens and scoring ------------------------------------------------
class Workshop:
    """What every arm shares: the tokenizer, the held-out set, the device, the verifier of the task."""

    def __init__(self, run: ImproveRun, cfg: ImproveConfig):
        self.cfg = cfg
        self.tok = Tokenizer.from_file(run.require(run.tokenizer, "improve"))
        self.heldout = read_examples(run.heldout)
        self.heldout_prompts = {row["prompt"] for row in self.heldout}
        self.reversed = cfg.task.answer_order == "reversed"
        self.heldout_rows = self.rows(self.heldout)
        self.device = pick_device(cfg.retrain.device)
        self.task_verifier = get_verifier(cfg.task.kind)
        self.stops = {self.tok.eos_id, self.tok.bos_id}  # an answer ends at <|eos|>
        self.banned = {self.tok.special_id(name) for name in SPECIAL_TOKENS} - self.stops  # no chat tokens inside

    def rows(self, examples: list[dict], learn_prompts: bool = False) -> list[tuple[list[int], int]]:
        """Token rows as the model learns them (the answer reversed for answer_order 'reversed'):
        [bos] prompt answer [eos], and how many leading tokens the loss skips: the prompt's, or only
        <|bos|> when the model must also learn to write prompts (propose.self_new_tasks)."""
        prompts = self.tok.encode_batch([e["prompt"] for e in examples])
        answers = self.tok.encode_batch([e["answer"][::-1] if self.reversed else e["answer"] for e in examples])
        bos, eos = self.tok.bos_id, self.tok.eos_id
        return [([bos, *p, *a, eos], 1 if learn_prompts else len(p) + 1) for p, a in zip(prompts, answers)]

    def answers(self, model: GPT, prompts: list[str], k: int = 1, temperature: float = 0.0, top_k=None,
                seed: int = 0) -> list[list[str]]:
        """k answers per prompt (greedy at temperature 0), in the task's natural order."""
        ids = [encode_example(self.tok, p)[0] for p in prompts]
        outs = complete(model, ids, self.cfg.propose.max_answer_tokens, k, temperature, top_k, seed,
                        stop_ids=self.stops, pad_id=self.tok.pad_id, banned_ids=self.banned)
        texts = [[self.tok.decode(s) for s in samples] for samples in outs]
        return [[t[::-1] for t in samples] for samples in texts] if self.reversed else texts

    def new_tasks(self, model: GPT, n: int, exclude: set[str], seed: int) -> list[str]:
        """Up to n new prompts the model writes itself: free samples from <|bos|>, cut at the prompt's end."""
        [samples] = complete(model, [[self.tok.bos_id]], model.cfg.block_size - 1, n, 1.0, None, seed,
                             stop_ids=self.stops, pad_id=self.tok.pad_id, banned_ids=self.banned)
        return written_prompts([self.tok.decode(s) for s in samples], exclude)

    @torch.no_grad()
    def heldout_loss(self, model: GPT) -> float:
        """Mean loss (nats) per answer token of the held-out set: the perplexity the collapse guard watches."""
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for start in range(0, len(self.heldout_rows), 512):
            x, y, mask = pad_rows(self.heldout_rows[start : start + 512], self.tok.pad_id)
            _, loss = model(x.to(self.device), targets=y.to(self.device), loss_mask=mask.to(self.device))
            total += loss.item() * int(mask.sum())
            count += int(mask.sum())
        model.train(was_training)
        return total / count

    def score(self, model: GPT) -> dict:
        """Greedy held-out accuracy with per-item correctness (for the paired gate) and perplexity."""
        prompts = [r["prompt"] for r in self.heldout]
        answers = [a for [a] in self.answers(model, prompts)]
        correct = [int(self.task_verifier(p, a).passed) for p, a in zip(prompts, answers)]
        loss = self.heldout_loss(model)
        return {"accuracy": sum(correct) / len(correct), "correct": correct, "ppl": math.exp(min(loss, 50.0)),
                "loss": loss, "examples": [{"prompt": p, "answer": a} for p, a in list(zip(prompts, answers))[:5]]}

    def new_model(self, cfg: ImproveConfig, seed: int) -> GPT:
        torch.manual_seed(seed)  # weight init is part of the recipe
        return GPT(cfg.model.model_copy(update={"vocab_size": self.tok.vocab_size}))

    def fit(self, model: GPT, train_cfg, examples: list[dict], rework: list[dict], out_dir, rework_share,
            stage: str, die_prefix: str | None = None):
        """Train on originals + rework with the shared loop; resumes from out_dir's checkpoint if any."""
        if latest_checkpoint(out_dir / "checkpoints") is None:
            shutil.rmtree(out_dir, ignore_errors=True)  # a kill before the first checkpoint: start clean
        learn_prompts = self.cfg.propose.self_new_tasks > 0
        orig_rows, rework_rows = self.rows(examples, learn_prompts), self.rows(rework, learn_prompts)
        for row, example in zip(orig_rows + rework_rows, examples + rework):
            if len(row[0]) > model.cfg.block_size + 1:
                raise LatheError(f"example {example['prompt']!r} -> {example['answer']!r} has {len(row[0])} tokens, "
                                 f"more than block_size {model.cfg.block_size} + 1: raise model.block_size")
        get_batch = mix_batches(orig_rows, rework_rows, train_cfg.batch_size, train_cfg.seed, rework_share,
                                self.tok.pad_id)
        if die_prefix is not None and os.environ.get(DIE_AT, "").startswith(die_prefix):
            inner = get_batch

            def get_batch(i):
                _die_if(f"{die_prefix}{i}")
                return inner(i)

        def evaluate(m):
            scored = self.score(m)
            return {"val_loss": scored["loss"], "val_accuracy": scored["accuracy"]}

        return train(model, train_cfg, get_batch, evaluate, out_dir, resume=True, stage=stage)


# --- round 0: the originals, the held-out set, the tokenizer, the base model -------------------------------
def setup_run(run: ImproveRun, cfg: ImproveConfig) -> None:
    """Write the held-out set, the originals and the tokenizer (each once; idempotent)."""
    if not run.heldout.exists():
        write_jsonl(run.heldout, make_tasks(cfg.task, (cfg.task.seed, "heldout"), cfg.task.heldout_size))
    if not (run.orig / "manifest.json").exists():
        taken = {r["prompt"] for r in read_examples(run.heldout)}
        seed = []
        for i, draw in enumerate(cfg.task.seed_sets):
            rows = make_tasks(cfg.task, (cfg.task.seed, "seed", i), draw.size, exclude=taken, options=draw.options)
            taken |= {r["prompt"] for r in rows}
            options = cfg.task.options if draw.options is None else draw.options
            seed += [{**r, "source": f"generator:{cfg.task.kind} {json.dumps(options)}"} for r in rows]
        write_originals(run, seed)
    if not run.tokenizer.exists():
        rows = load_originals(run)
        tok = train_tokenizer((text for r in rows for text in (r["prompt"], r["answer"])), cfg.tokenizer)
        tok.save(run.tokenizer)


def base_round(ws: Workshop, arm: Arm) -> None:
    """Train and score the base model (and, for gate.noise_runs > 1, its seed siblings)."""
    run, cfg, state = arm.run, arm.cfg, arm.state
    if state.phase == "":
        started = time.perf_counter()
        model = ws.new_model(cfg, cfg.train.seed)
        ws.fit(model, cfg.train, load_originals(run), [], run.model_dir(0), None, "round 0 base",
               die_prefix="loop:0:retrain@")
        _finish(arm, 0, "retrain", started)
    if state.phase == "retrain":
        started = time.perf_counter()
        result = ws.score(load_model(run.model_dir(0), ws.device))
        write_json(run.work(0) / "eval.json", result)
        state.base_ppl = result["ppl"]
        _finish(arm, 0, "evaluate", started)
    if state.phase == "evaluate":
        started = time.perf_counter()
        accuracies = [read_json(run.work(0) / "eval.json")["accuracy"]]
        for k in range(1, cfg.gate.noise_runs):  # same recipe, other seeds: how much does a run move?
            seed_cfg = cfg.train.model_copy(update={"seed": cfg.train.seed + k})
            model = ws.new_model(cfg, seed_cfg.seed)
            out = run.path / "models" / f"round-0-seed-{k}"
            ws.fit(model, seed_cfg, load_originals(run), [], out, None, f"round 0 noise run {k}")
            accuracies.append(ws.score(model)["accuracy"])
        state.run_noise = run_spread(accuracies)
        write_json(run.work(0) / "noise.json", {"accuracies": accuracies, "run_noise": state.run_noise})
        _finish(arm, 0, "noise", started)
        state.round, state.phase, state.round_seconds = 1, "", 0.0
        state.save(run)


def _finish(arm: Arm, round_: int, phase: str, started: float) -> None:
    _die_if(f"{arm.name}:{round_}:{phase}")  # the test hook: output written, state not yet
    arm.state.phase = phase
    arm.state.round_seconds += time.perf_counter() - started
    arm.state.save(arm.run)


# --- one round -------------------------------------------------------------------------------------------
def champion_id(arm: Arm) -> str:
    ckpt = latest_checkpoint(arm.run.model_dir(arm.state.champion) / "checkpoints")
    return f"round-{arm.state.champion} champion {ckpt.relative_to(arm.run.home.path)}"


def phase_inbox(ws: Workshop, arm: Arm, r: int) -> None:
    if arm.run.home is arm.run:  # the arms share the home run's originals
        for name in ingest_inbox(arm.run, r):
            info(f"round {r}: inbox file joined the originals as data/orig/{name}")


def phase_propose(ws: Workshop, arm: Arm, r: int) -> None:
    cfg = arm.cfg
    candidates = []
    if arm.proposes:
        originals = load_originals(arm.run)
        picks = choose_prompts(cfg.task, cfg.propose, r, originals, ws.heldout_prompts)
        prompts = [p for p, _ in picks]
        if cfg.propose.father_url:
            father = Father.from_config(cfg.propose, originals)
            new = [p for p in father.new_tasks(cfg.propose.father_new_tasks) if p not in ws.heldout_prompts]
            picks += [(p, "father:new-task") for p in new]
            prompts += new
            answers, maker = father.answer(prompts, cfg.propose.samples_per_prompt, cfg.propose.temperature), father.name
        else:
            model = load_model(arm.run.model_dir(arm.state.champion), ws.device)
            p = cfg.propose
            if p.self_new_tasks:
                new = ws.new_tasks(model, p.self_new_tasks, set(prompts) | ws.heldout_prompts, seed=cfg.task.seed * 1000 + r)
                picks += [(q, "self:new-task") for q in new]
                prompts += new
            answers = ws.answers(model, prompts, p.samples_per_prompt, p.temperature, p.top_k, seed=cfg.task.seed * 1000 + r)
            maker = champion_id(arm)
        for (prompt, source), samples in zip(picks, answers):
            candidates += [{"prompt": prompt, "answer": a, "source": source, "model": maker} for a in samples]
    write_jsonl(arm.run.work(r) / "candidates.jsonl", candidates)


def phase_verify(ws: Workshop, arm: Arm, r: int) -> None:
    """Filters, then the verifier, then dedup (against the originals and every earlier kept round)."""
    cfg = arm.cfg
    name = cfg.verify.verifier or cfg.task.kind
    verifier = None if name == "none" else get_verifier(name)
    checks = [(f, get_filter(f)) for f in cfg.verify.filters if f != "dedup"]
    dedup = get_filter("dedup") if "dedup" in cfg.verify.filters else None
    if dedup is not None:
        for row in load_originals(arm.run) + load_rework(arm.run, r - 1):
            dedup(row["prompt"], row["answer"])  # what we already have is not new
    candidates = read_jsonl(arm.run.work(r) / "candidates.jsonl")
    lengths = [len(ids) for ids, _ in ws.rows(candidates)] if candidates else []
    verdicts = []
    for cand, length in zip(candidates, lengths):
        if length > cfg.model.block_size + 1:  # a father's long task: more than the model can learn from
            verdict = {"kept": False, "rejected_by": "filter:context", "score": 0.0,
                       "reason": f"{length} tokens, more than block_size {cfg.model.block_size} + 1"}
        else:
            verdict = judge(cand, checks, verifier, name, dedup)
        verdicts.append({**cand, **verdict})
    if cfg.verify.drop_mastered and verifier is not None:
        drop_mastered(verdicts)
    write_jsonl(arm.run.work(r) / "verdicts.jsonl", verdicts)


def drop_mastered(verdicts: list[dict]) -> None:
    """Reject the kept samples of prompts whose samples all passed the verifier (dedup aside): the
    champion answers those reliably already, and training on them would drown the rare right answers
    to prompts it is still learning."""
    passed: dict[str, list[bool]] = {}
    for v in verdicts:
        passed.setdefault(v["prompt"], []).append(v["kept"] or v["rejected_by"] == "filter:dedup")
    for v in verdicts:
        samples = passed[v["prompt"]]
        if v["kept"] and len(samples) > 1 and all(samples):
            v.update(kept=False, rejected_by="filter:mastered",
                     reason=f"all {len(samples)} samples right: the champion already masters this prompt")


def judge(cand: dict, checks, verifier, verifier_name: str, dedup) -> dict:
    prompt, answer = cand["prompt"], cand["answer"]
    for fname, check in checks:
        v = check(prompt, answer)
        if not v.passed:
            return {"kept": False, "rejected_by": f"filter:{fname}", "score": v.score, "reason": v.reason}
    verdict = {"verifier": "none", "score": 1.0, "reason": "kept without verification"}
    if verifier is not None:
        try:
            v = verifier(prompt, answer)
        except ValueError as e:  # a prompt the verifier cannot read (a father's malformed new task)
            return {"kept": False, "rejected_by": "malformed prompt", "score": 0.0, "reason": str(e)}
        if not v.passed:
            return {"kept": False, "rejected_by": f"verifier:{verifier_name}", "score": v.score, "reason": v.reason}
        verdict = {"verifier": verifier_name, "score": v.score, "reason": v.reason}
    if dedup is not None:
        v = dedup(prompt, answer)
        if not v.passed:
            return {"kept": False, "rejected_by": "filter:dedup", "score": v.score, "reason": v.reason}
    return {"kept": True, **verdict}


def phase_accumulate(ws: Workshop, arm: Arm, r: int) -> None:
    verdicts = read_jsonl(arm.run.work(r) / "verdicts.jsonl")
    kept = [{k: v[k] for k in ("prompt", "answer", "model", "verifier", "score", "reason", "source")} | {"round": r}
            for v in verdicts if v["kept"]]
    rejected: dict[str, int] = {}
    examples = []  # the first two of each kind of rejection, for the report
    for v in verdicts:
        if not v["kept"]:
            rejected[v["rejected_by"]] = rejected.get(v["rejected_by"], 0) + 1
            if rejected[v["rejected_by"]] <= 2:
                examples.append(f"{v['prompt']}{v['answer']} -> {v['rejected_by']}: {v['reason']}")
    write_round(arm.run, r, kept, {"round": r, "candidates": len(verdicts), "kept": len(kept),
                                   "rejected": sum(rejected.values()), "rejected_by": rejected,
                                   "rejected_examples": examples})


def phase_retrain(ws: Workshop, arm: Arm, r: int) -> None:
    cfg, run = arm.cfg, arm.run
    start = {"champion": arm.state.champion, "base": 0, "scratch": None}[cfg.retrain_from]
    model = ws.new_model(cfg, cfg.train.seed)
    if start is not None:
        load_weights(model, latest_checkpoint(run.model_dir(start) / "checkpoints"))
    train_cfg = cfg.retrain.model_copy(update={"seed": cfg.retrain.seed + r})  # fresh batches every round
    ws.fit(model, train_cfg, load_originals(run), load_rework(run, r), run.model_dir(r), cfg.rework_share,
           f"{arm.name} round {r}", die_prefix=f"{arm.name}:{r}:retrain@")


def phase_evaluate(ws: Workshop, arm: Arm, r: int) -> None:
    write_json(arm.run.work(r) / "eval.json", ws.score(load_model(arm.run.model_dir(r), ws.device)))


def phase_gate(ws: Workshop, arm: Arm, r: int) -> None:
    cfg, state = arm.cfg, arm.state
    cand = read_json(arm.run.work(r) / "eval.json")
    champ = read_json(arm.run.work(state.champion) / "eval.json")
    d = decide(cand["correct"], champ["correct"], cfg.gate.margin_sigma, cfg.gate.min_gain, state.run_noise,
               cfg.gate.bootstrap, seed=r)
    promote, reason = d.promote, d.reason
    if cand["ppl"] > state.base_ppl * cfg.gate.collapse_ppl_ratio:
        promote = False
        reason = (f"collapse: held-out perplexity {cand['ppl']:.3f} > {cfg.gate.collapse_ppl_ratio:g} x base "
                  f"{state.base_ppl:.3f}; loop stopped")
        state.stopped = reason
    manifest = read_json(arm.run.rework(r) / "manifest.json")
    row = {"round": r, "arm": arm.name, "candidate_accuracy": cand["accuracy"], "champion_before": state.champion,
           "champion_accuracy_before": champ["accuracy"], "promoted": promote, "reason": reason,
           "gain": d.gain, "noise": d.noise, "champion": r if promote else state.champion,
           "accuracy": cand["accuracy"] if promote else champ["accuracy"],
           "candidate_ppl": cand["ppl"], "ppl": cand["ppl"] if promote else champ["ppl"], "base_ppl": state.base_ppl,
           "candidates": manifest["candidates"], "kept": manifest["kept"], "rejected": manifest["rejected"],
           "rejected_by": manifest["rejected_by"], "rework_size": len(load_rework(arm.run, r)),
           "seconds": round(state.round_seconds, 1)}
    write_jsonl(arm.run.rounds, [x for x in read_jsonl(arm.run.rounds) if x["round"] != r] + [row])
    if promote:
        state.champion = r


PHASE_FNS = {"inbox": phase_inbox, "propose": phase_propose, "verify": phase_verify,
             "accumulate": phase_accumulate, "retrain": phase_retrain, "evaluate": phase_evaluate,
             "gate": phase_gate}


def run_round(ws: Workshop, arm: Arm, r: int) -> dict:
    """Run round r's unfinished phases; return its rounds.jsonl row."""
    state = arm.state
    check_originals(arm.run)
    done = ROUND_PHASES.index(state.phase) + 1 if state.phase else 0
    for phase in ROUND_PHASES[done:]:
        started = time.perf_counter()
        PHASE_FNS[phase](ws, arm, r)
        _finish(arm, r, phase, started)
    check_originals(arm.run)
    state.round, state.phase, state.round_seconds = r + 1, "", 0.0
    state.save(arm.run)
    return next(x for x in read_jsonl(arm.run.rounds) if x["round"] == r)


# --- the whole run ---------------------------------------------------------------------------------------
def make_arms(run: ImproveRun, cfg: ImproveConfig, controls: bool) -> list[Arm]:
    arms = [Arm("loop", run, cfg)]
    if controls:
        keep_all = cfg.model_copy(update={"verify": cfg.verify.model_copy(update={"verifier": "none"})})
        arms += [Arm("keep-all", run.arm("keep-all"), keep_all), Arm("no-loop", run.arm("no-loop"), cfg, proposes=False)]
    return arms


# --- arms side by side --------------------------------------------------------------------------------
class ArmRunner:
    """Runs one round of several arms: in this process, or side by side in worker processes.

    The arms share nothing they write (each has its own folders and state.json), so their rounds are
    independent; on a 2-core machine the control arms then cost little wall time. Workers are spawned
    (not forked: torch's thread pools do not survive a fork), use cfg.threads each, and die with the
    loop (Linux): a killed loop leaves no worker writing behind it, and --resume redoes unfinished phases."""

    def __init__(self, run: ImproveRun, cfg: ImproveConfig, controls: bool, arms: int):
        self.run, self.cfg, self.controls = run, cfg, controls
        workers = min(cfg.workers or os.cpu_count() or 1, arms)
        self.pool = None
        if workers > 1:
            context = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(workers, context, initializer=_worker_init, initargs=(cfg.threads,))

    def round(self, ws: "Workshop", arms: list[Arm], r: int) -> dict:
        if self.pool is None or len(arms) == 1:
            return {arm.name: run_round(ws, arm, r) for arm in arms}
        jobs = {arm.name: self.pool.submit(_round_in_worker, str(self.run.path), self.cfg, self.controls, arm.name, r)
                for arm in arms}
        try:
            rows = {name: job.result() for name, job in jobs.items()}
        except BrokenProcessPool:
            raise LatheError(f"a worker process of round {r} died; `lathe improve --resume` continues the run "
                             f"from its last finished phase") from None
        for arm in arms:
            arm.state = State.load(arm.run)
        return rows

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _worker_init(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):  # die with the parent: no orphan writes into a resumed run
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def _round_in_worker(run_path: str, cfg: ImproveConfig, controls: bool, name: str, r: int) -> dict:
    run = ImproveRun(run_path)
    arm = next(a for a in make_arms(run, cfg, controls) if a.name == name)
    arm.state = State.load(arm.run)
    return run_round(Workshop(run, cfg), arm, r)


def improve(run: ImproveRun, cfg: ImproveConfig, forever: bool = False, max_rounds: int | None = None) -> dict:
    """Run (or resume) the loop in `run`: round 0, then rounds until cfg.rounds (or, with forever, until
    max_rounds, if given), the collapse guard or cfg.target_accuracy stops it. Returns {arm: rows}."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    setup_run(run, cfg)
    ws = Workshop(run, cfg)
    controls = cfg.controls and not forever
    arms = make_arms(run, cfg, controls)
    home = arms[0]
    home.state = State.load(run) or State()
    if home.state.round == 0:
        base_round(ws, home)
    base = read_json(run.work(0) / "eval.json")
    info(f"round 0: base model {base['accuracy']:.1%} held-out accuracy, perplexity {base['ppl']:.3f}"
         + (f", run-to-run spread {home.state.run_noise:.3f}" if cfg.gate.noise_runs > 1 else ""))
    for arm in arms[1:]:
        arm.state = State.load(arm.run) or State(round=1, base_ppl=home.state.base_ppl, run_noise=home.state.run_noise)
        arm.state.save(arm.run)  # a worker process reads it from there
        write_text(arm.run.config, dump_config(arm.cfg))
    last = max_rounds if forever else cfg.rounds
    r = min(arm.state.round for arm in arms)
    runner = ArmRunner(run, cfg, controls, len(arms))
    try:
        while (last is None or r <= last) and not _should_stop(run, home, cfg, r):
            rows = runner.round(ws, [arm for arm in arms if arm.state.round == r and not arm.state.stopped], r)
            info(round_line(r, rows))
            write_report(run)  # after every round: a long --forever run shows its progress
            r += 1
    finally:
        runner.close()
    if home.state.stopped:
        info(f"loop stopped: {home.state.stopped}")
    info(f"improve: {time.perf_counter() - started:.0f} s wall, {cpu_seconds() - cpu_started:.0f} s CPU "
         f"in this session; report in {write_report(run)}")
    return {arm.name: read_jsonl(arm.run.rounds) for arm in arms}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _should_stop(run: ImproveRun, home: Arm, cfg: ImproveConfig, r: int) -> bool:
    """Stop before round r when the loop collapsed or its champion already reached the target."""
    if home.state.round > r:  # the loop finished r already; only a control arm still owes it
        return False
    if home.state.stopped:
        return True
    if cfg.target_accuracy is not None:
        champ = read_json(run.work(home.state.champion) / "eval.json")["accuracy"]
        if champ >= cfg.target_accuracy:
            info(f"target accuracy {cfg.target_accuracy:.0%} reached by the round-{home.state.champion} champion")
            return True
    return False


def round_line(r: int, rows: dict) -> str:
    parts = []
    for name, row in rows.items():
        verdict = "promoted" if row["promoted"] else "kept champion"
        parts.append(f"{name} {row['accuracy']:.1%} (candidate {row['candidate_accuracy']:.1%}, {verdict}, "
                     f"kept {row['kept']}/{row['candidates']})")
    return f"round {r}: " + " | ".join(parts)

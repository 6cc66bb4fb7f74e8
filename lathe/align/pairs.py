"""Preference pairs and the tokenization every alignment stage shares.

A row of a pairs file is `{"prompt", "chosen", "rejected"}`. The prompt is a string, or a list of chat
messages (rendered with `lathe.chat.render_chat`, the responses then being the assistant's reply).
Pairs can also be made from the model's own samples, ranked by a verifier or an A/B judge.

Every stage sees an example as (prompt ids, response ids): the prompt is conditioning only, the
response is what gets scored (reward model), compared (DPO) or reinforced (RL).

    [bos] prompt ... | response ... <|eos|>            plain text
    [bos] <|user_start|> ... <|assistant_start|> | reply ... <|assistant_end|>     chat
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from lathe.chat import render_chat, validate_messages
from lathe.errors import LatheError
from lathe.io import iter_jsonl_objects

Prompt = str | list  # a plain-text prompt or a list of chat messages


@dataclass(frozen=True)
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response tokens only
    rejected_ids: list[int]


# --- tokenization -------------------------------------------------------------------------------
def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """The ids a response is generated after: `[bos] + text`, or the chat up to `<|assistant_start|>`."""
    if isinstance(prompt, str):
        return [tokenizer.bos_id] + tokenizer.encode(prompt)
    return render_chat(tokenizer, prompt, add_generation_prompt=True)[0]


def encode_response(tokenizer, prompt: Prompt, response: str) -> list[int]:
    """Response ids including the token that ends it, so preferences and rewards also teach stopping."""
    if isinstance(prompt, str):
        return tokenizer.encode(response) + [tokenizer.eos_id]
    return tokenizer.encode(response) + [tokenizer.special_id("<|assistant_end|>")]


def prompt_text(prompt: Prompt) -> str:
    """What a verifier reads as the prompt: the text, or the last user message of a chat."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def prompt_for(scorer: Callable, prompt: Prompt) -> Prompt:
    """Verifiers read prompt text; a scorer marked `raw_prompt` (a reward model) gets the chat itself."""
    return prompt if getattr(scorer, "raw_prompt", False) else prompt_text(prompt)


def stop_ids(tokenizer) -> set[int]:
    """Tokens that end a sampled response, in both plain and chat form."""
    return {tokenizer.eos_id, tokenizer.bos_id, tokenizer.special_id("<|assistant_end|>")}


def fit_length(prompt_ids: list[int], responses: list[list[int]], max_len: int) -> tuple[list[int], list[list[int]]]:
    """Cut prompt + each response to max_len tokens: the prompt loses its oldest tokens (keeping at least
    half the room), the responses their tails. Responses to one prompt share one cut prompt."""
    longest = max(len(r) for r in responses)
    if len(prompt_ids) + longest <= max_len:
        return prompt_ids, responses
    keep = min(len(prompt_ids), max(max_len // 2, max_len - longest))
    return prompt_ids[len(prompt_ids) - keep:], [r[: max_len - keep] for r in responses]


def tokenize_pair(tokenizer, row: dict, max_len: int) -> PreferencePair:
    prompt = encode_prompt(tokenizer, row["prompt"])
    responses = [encode_response(tokenizer, row["prompt"], row[key]) for key in ("chosen", "rejected")]
    prompt, (chosen, rejected) = fit_length(prompt, responses, max_len)
    return PreferencePair(prompt, chosen, rejected)


# --- pairs files ----------------------------------------------------------------------------------
def check_pair_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise LatheError(f"{where}: expected an object with prompt, chosen, rejected")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise LatheError(f"{where}: missing field(s) {', '.join(missing)}")
    if isinstance(row["prompt"], list):
        validate_messages(row["prompt"], f"{where}: prompt")
    elif not isinstance(row["prompt"], str):
        raise LatheError(f"{where}: 'prompt' must be a string or a list of chat messages")
    for key in ("chosen", "rejected"):
        if not isinstance(row[key], str):
            raise LatheError(f"{where}: '{key}' must be a string")
    if row["chosen"] == row["rejected"]:
        raise LatheError(f"{where}: 'chosen' and 'rejected' are identical")
    return row


def read_pair_rows(path: str | Path) -> list[dict]:
    """Validated rows of a pairs .jsonl file; a malformed row raises LatheError naming file:line."""
    rows = [check_pair_row(row, where) for where, row in iter_jsonl_objects(path, "pairs file")]
    if not rows:
        raise LatheError(f"{path}: no preference pairs")
    return rows


def load_pairs(path: str | Path, tokenizer, max_len: int) -> list[PreferencePair]:
    return [tokenize_pair(tokenizer, row, max_len) for row in read_pair_rows(path)]


def split_holdout(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded (train, held-out) split; the held-out part has at least one item."""
    if len(items) < 2:
        raise LatheError(f"need at least 2 examples to hold some out, got {len(items)}")
    order = np.random.default_rng(seed).permutation(len(items))
    n_held = min(len(items) - 1, max(1, round(fraction * len(items))))
    return [items[i] for i in order[n_held:]], [items[i] for i in order[:n_held]]


# --- batches --------------------------------------------------------------------------------------
def lm_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids, response ids) rows -> right-padded (x, y) where y is -100 outside the response:
    the targets whose log-probabilities DPO and RL score."""
    width = max(len(p) + len(r) for p, r in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (p, r) in enumerate(examples):
        ids = torch.tensor(p + r, dtype=torch.long)
        x[row, : len(ids) - 1] = ids[:-1]
        y[row, len(p) - 1 : len(ids) - 1] = ids[len(p):]
    return x, y


def score_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows -> right-padded ids and the index of each row's last token (where a reward head reads)."""
    width = max(len(p) + len(r) for p, r in examples)
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    for row, (p, r) in enumerate(examples):
        x[row, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
    last = torch.tensor([len(p) + len(r) - 1 for p, r in examples], dtype=torch.long)
    return x, last


def unprefixed(metrics: dict, prefix: str) -> dict:
    """The loop's last evaluation ({"val_accuracy": ...}) under the names the stage reports ({"accuracy": ...})."""
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


def pair_rows(pairs: Sequence[PreferencePair]) -> list[tuple[list[int], list[int]]]:
    """All chosen examples, then all rejected ones: row i and row i + len(pairs) form a pair."""
    return [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]


def pair_batches(pairs: Sequence[PreferencePair], batch_size: int, seed: int, collate: Callable, pad_id: int):
    """get_batch(i) for the training loop: `batch_size` pairs drawn by (seed, i), chosen rows first."""
    if not pairs:
        raise LatheError("no preference pairs to train on")

    def get_batch(i: int):
        picks = np.random.default_rng([seed, i]).integers(0, len(pairs), size=batch_size)
        return collate(pair_rows([pairs[j] for j in picks]), pad_id)

    return get_batch


def fixed_batches(pairs: Sequence[PreferencePair], batch_size: int, collate: Callable, pad_id: int):
    """Every pair once, in order: for held-out evaluation."""
    for start in range(0, len(pairs), batch_size):
        yield collate(pair_rows(pairs[start : start + batch_size]), pad_id)


# --- pairs from the model's own samples -------------------------------------------------------------
def score_of(result) -> float:
    """A verifier's answer as a number: a Verdict (its .score), a bool or a number."""
    return float(getattr(result, "score", result))


def judge_share(result) -> float:
    """How much answer a beat answer b: a lathe.verify JudgeResult (winner a / b / tie) or a number in [0, 1]."""
    winner = getattr(result, "winner", None)
    if winner is not None:
        return {"a": 1.0, "b": 0.0, "tie": 0.5}[winner]
    return score_of(result)


def sample_ids(model, prompt_ids: list[int], k: int, max_tokens: int, temperature: float, seed: int,
               stops: set[int], top_k: int | None = None) -> list[list[int]]:
    """k sampled continuations of one prompt (one shared prefill), each ending with its stop token if it
    produced one. Temperature 0 is greedy."""
    from lathe.generate import stream_ids

    outputs: list[list[int]] = [[] for _ in range(k)]
    for step in stream_ids(model, prompt_ids, max_tokens, k, temperature, top_k, seed=seed, stop_ids=stops):
        for i, t in enumerate(step):
            if t is not None:
                outputs[i].append(t)
    return outputs


def decode_response(tokenizer, ids: list[int]) -> str:
    stops = stop_ids(tokenizer)
    return tokenizer.decode([t for t in ids if t not in stops])


def sample_responses(model, tokenizer, prompt: Prompt, k: int, max_tokens: int, temperature: float,
                     seed: int) -> list[str]:
    """k sampled response texts for one prompt."""
    ids = sample_ids(model, encode_prompt(tokenizer, prompt), k, max_tokens, temperature, seed, stop_ids(tokenizer))
    return [decode_response(tokenizer, r) for r in ids]


def pairs_from_verifier(model, tokenizer, prompts: Sequence[Prompt], verifier: Callable, k: int = 4,
                        max_tokens: int = 64, temperature: float = 1.0, seed: int = 0) -> list[dict]:
    """Sample k responses per prompt; pair the best against the worst by `verifier(prompt, response)`
    (a lathe.verify verifier or any callable returning a number). Prompts whose samples all score the
    same give no pair."""
    rows = []
    for n, prompt in enumerate(prompts):
        responses = sample_responses(model, tokenizer, prompt, k, max_tokens, temperature, seed + n)
        scores = [score_of(verifier(prompt_for(verifier, prompt), r)) for r in responses]
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        if scores[best] > scores[worst] and responses[best] != responses[worst]:
            rows.append({"prompt": prompt, "chosen": responses[best], "rejected": responses[worst],
                         "chosen_score": scores[best], "rejected_score": scores[worst]})
    return rows


def pairs_from_judge(model, tokenizer, prompts: Sequence[Prompt], judge: Callable, k: int = 4,
                     max_tokens: int = 64, temperature: float = 1.0, seed: int = 0) -> list[dict]:
    """Like pairs_from_verifier, ranked by an A/B judge `judge(prompt, a, b)`: a lathe.verify JudgeResult
    (e.g. functools.partial(judge_pair, scorer=...)) or how much a beats b in [0, 1] (0.5 = tie).
    Every pair of samples is judged in both orders, which cancels a judge's preference for the first
    (or second) position; the samples with the most and fewest wins pair up."""
    rows = []
    for n, prompt in enumerate(prompts):
        responses = sample_responses(model, tokenizer, prompt, k, max_tokens, temperature, seed + n)
        wins = [0.0] * k
        for a in range(k):
            for b in range(k):
                if a != b:
                    share = judge_share(judge(prompt_text(prompt), responses[a], responses[b]))
                    wins[a] += share
                    wins[b] += 1.0 - share
        best, worst = int(np.argmax(wins)), int(np.argmin(wins))
        if wins[best] > wins[worst] and responses[best] != responses[worst]:
            rows.append({"prompt": prompt, "chosen": responses[best], "rejected": responses[worst],
                         "chosen_score": wins[best] / (2 * (k - 1)), "rejected_score": wins[worst] / (2 * (k - 1))})
    return rows


# --- prompt files and stage inputs -----------------------------------------------------------------
def read_prompts(path: str | Path) -> list:
    """Prompts from a .jsonl file ({"prompt": text or messages, ...extra fields for verifiers}) or a text
    file (one prompt per line). A malformed row raises LatheError naming file:line."""
    path = Path(path)
    if path.suffix != ".jsonl":
        if not path.is_file():
            raise LatheError(f"prompts file {path} does not exist")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = []
        for where, row in iter_jsonl_objects(path, "prompts file"):
            if not isinstance(row.get("prompt"), (str, list)):
                raise LatheError(f"{where}: expected an object with a 'prompt' (text or chat messages)")
            if isinstance(row["prompt"], list):
                validate_messages(row["prompt"], f"{where}: prompt")
            prompts.append(row)
    if not prompts:
        raise LatheError(f"{path}: no prompts")
    return prompts


def task_prompts(kind: str, n: int, seed: int, **options) -> list[str]:
    """n distinct prompts from a lathe.verify task generator (its verifier has the same name)."""
    from lathe.verify.tasks import generate

    return list(dict.fromkeys(t.prompt for t in generate(kind, seed, n, **options)))


def load_preference_data(tokenizer, data: Sequence[str | Path], val_data: Sequence[str | Path] | None,
                         val_fraction: float, seed: int, max_len: int) -> tuple[list, list]:
    """Training and held-out pairs: the held-out ones from `val_data`, else a seeded share of `data`."""
    pairs = [p for path in data for p in load_pairs(path, tokenizer, max_len)]
    if val_data:
        return pairs, [p for path in val_data for p in load_pairs(path, tokenizer, max_len)]
    return split_holdout(pairs, val_fraction, seed)


# --- the plumbing the three stages share ------------------------------------------------------------
@dataclass
class Stage:
    """A stage's inputs: the base run, its tokenizer, the output run directory and the options."""
    base: object  # RunDir
    tokenizer: object
    out: Path
    train: object  # TrainConfig
    model_overrides: dict
    section: dict  # `--set <section>.FIELD=VALUE` for the stage's own section (rl.*)

    def load_model(self):
        from lathe.finetune.sft import load_base_model

        return load_base_model(self.base.path, self.model_overrides)


def open_stage(base, out, name, suffix: str, defaults: dict, overrides=(), section: str | None = None) -> Stage:
    """Resolve the base run, read its tokenizer, pick the output run (which gets a copy of the tokenizer,
    so it is a run of its own that `lathe generate` and later stages can use) and build the options
    the way the fine-tuning stages do (lathe.finetune.sft.stage_options)."""
    from lathe.config import parse_override
    from lathe.finetune.sft import output_dir, prepare_output, stage_options
    from lathe.rundir import RunDir
    from lathe.tokenizer import Tokenizer

    base_run = RunDir.resolve(base)
    own, rest = {}, []
    for text in overrides:
        keys, value = parse_override(text)
        if section and keys[0] == section:
            if len(keys) != 2:
                raise LatheError(f"--set {text}: expected {section}.FIELD=VALUE")
            own[keys[1]] = value
        else:
            rest.append(text)
    cfg, model_overrides = stage_options(base_run, defaults, rest)
    tokenizer = Tokenizer.from_file(base_run.require(base_run.tokenizer, "tokenizer"))
    out = output_dir(out, name, f"{base_run.path.name}-{suffix}")
    if out.resolve() == base_run.path.resolve():
        raise LatheError(f"the output {out} is the base run itself: pick another --out or --name")
    prepare_output(out, base_run.tokenizer)
    return Stage(base_run, tokenizer, out, cfg, model_overrides, own)


def run_pairs(base, out_file: str | Path, prompts=None, task: str | None = None, n: int = 200, verifier=None,
              reward_model=None, k: int = 4, max_tokens: int = 64, temperature: float = 1.0,
              seed: int = 0) -> list[dict]:
    """`lathe align pairs`: the base model's own samples, ranked by a verifier (or a reward model),
    as a pairs .jsonl file for `lathe align reward` or `lathe align dpo`."""
    from lathe.console import info
    from lathe.finetune.sft import load_base_model
    from lathe.io import write_text
    from lathe.rundir import RunDir
    from lathe.tokenizer import Tokenizer

    run = RunDir.resolve(base)
    tokenizer = Tokenizer.from_file(run.require(run.tokenizer, "tokenizer"))
    items = read_prompts(prompts) if prompts else task_prompts(task, n, seed) if task else None
    if not items:
        raise LatheError("give prompts: --prompts FILE or --task KIND")
    texts = [row["prompt"] if isinstance(row, dict) else row for row in items]
    model = load_base_model(run.path)
    if reward_model:
        from lathe.align.reward import load_reward_model, reward_from_model

        rank = reward_from_model(load_reward_model(reward_model), tokenizer)
    elif verifier or task:
        from lathe.verify import get_verifier

        rank = get_verifier(verifier or task)
    else:
        raise LatheError("give a ranking: --verifier NAME or --reward-model RUN")
    rows = pairs_from_verifier(model, tokenizer, texts, rank, k, max_tokens, temperature, seed)
    write_text(out_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    info(f"pairs: {len(rows)} pairs from {len(texts)} prompts x {k} samples ({len(texts) - len(rows)} prompts "
         f"had no better sample) -> {out_file}")
    return rows

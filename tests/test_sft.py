import json
import random

import numpy as np
import pytest

from lathe.config import ModelConfig, TokenizerConfig
from lathe.errors import LatheError
from lathe.eval.metrics import is_well_formed_gsm8k
from lathe.finetune.sft import (encode_conversations, pack_examples, read_conversations, reference_answer, row_batches,
                                run_sft)
from lathe.model import GPT
from lathe.tokenizer import train_tokenizer
from lathe.train.checkpoint import save_checkpoint

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": "#### 5"}]


def sum_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"add {a} and {b}", "response": f"#### {a + b}"})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    texts = [f"add {r['prompt']} {r['response']} be brief hi there hello" for r in sum_rows(300, 0)]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=1))


def make_base_run(path, tok, block_size=48):
    """A run directory with a tokenizer and a random-init checkpoint: the smallest base for fine-tuning."""
    path.mkdir(parents=True)
    tok.save(path / "tokenizer.json")
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=block_size))
    save_checkpoint(path / "checkpoints", 0, model, None, {})
    return path


def test_loss_mask_covers_exactly_the_assistant_tokens(tok):
    end = tok.special_id("<|assistant_end|>")
    for conversation in (CHAT, CHAT[1:3]):
        examples, stats = encode_conversations(tok, [conversation], max_len=64)
        assert stats == {"examples": 1, "kept": 1, "truncated": 0, "dropped": 0}
        rows, masks = pack_examples(examples, row_len=64, pad_id=tok.pad_id)
        x, y, mask = row_batches(rows, masks, batch_size=1, seed=0)(0)
        assert (x[0, 1:] == y[0, :-1]).all()
        # the learned targets are the assistant contents and their closing <|assistant_end|>, nothing else
        expected = [t for m in conversation if m["role"] == "assistant" for t in tok.encode(m["content"]) + [end]]
        assert y[0][mask[0]].tolist() == expected
        assert int(mask.sum()) == len(expected) and not mask[0][y[0] == tok.pad_id].any()


def test_packing_keeps_every_example_whole(tok):
    rng = random.Random(1)
    examples = []
    for k in range(40):
        n = rng.randint(3, 30)
        ids = np.asarray([tok.bos_id] + [20 + k] * (n - 1), dtype=np.int64)  # each example is recognisable
        examples.append((ids, np.asarray([False] + [True] * (n - 1))))
    rows, masks = pack_examples(examples, row_len=64, pad_id=tok.pad_id, seed=3)
    assert rows.shape[1] == 64 and len(rows) < 40  # short examples share rows
    for k, (ids, m) in enumerate(examples):
        hits = [(r, s) for r in range(len(rows)) for s in range(64 - len(ids) + 1)
                if (rows[r, s : s + len(ids)] == ids).all() and (masks[r, s : s + len(ids)] == m).all()]
        assert len(hits) == 1, f"example {k} found {len(hits)} times"
    assert (rows != tok.pad_id).sum() == sum(len(ids) for ids, _ in examples) == masks.sum() + len(examples)


def test_long_examples_are_truncated_and_counted(tok):
    long = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello " * 80}]
    only_prompt = [{"role": "user", "content": "hi there " * 40}, {"role": "assistant", "content": "hello"}]
    examples, stats = encode_conversations(tok, [long, only_prompt, CHAT], max_len=64)
    assert stats == {"examples": 3, "kept": 2, "truncated": 2, "dropped": 1}
    assert all(len(ids) <= 64 for ids, _ in examples)


def test_malformed_rows_name_file_and_line(tmp_path):
    good = json.dumps({"prompt": "a", "response": "b"})
    cases = {
        "broken json": [good, "{not json"],
        "no known fields": [good, good, json.dumps({"text": "x"})],
        "bad role": [json.dumps({"messages": [{"role": "wizard", "content": "x"}]})],
        "no assistant": [good, json.dumps({"messages": [{"role": "user", "content": "x"}]})],
    }
    for name, lines in cases.items():
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(LatheError, match=f"{path}:{len(lines)}"):
            read_conversations(path)
    ok = [{"messages": CHAT}, {"question": "q", "answer": "#### 1"}]
    rows = read_conversations(write_jsonl(tmp_path / "ok.jsonl", ok))
    assert rows[0] == CHAT and rows[1][0] == {"role": "user", "content": "q"}


def test_sft_teaches_the_answer_format(tmp_path, tok):
    base = make_base_run(tmp_path / "base", tok)
    train = write_jsonl(tmp_path / "train.jsonl", sum_rows(300, 1))
    test = write_jsonl(tmp_path / "test.jsonl", sum_rows(12, 2))
    out = tmp_path / "sft"
    summary = run_sft(base, [train], out=out, test=test, format_eval=12, max_answer_tokens=12,
                      overrides=["train.max_steps=60", "train.lr=0.01", "train.eval_every=30", "train.batch_size=8",
                                 "train.device=cpu", "train.warmup_steps=5"])
    assert summary["format_before"]["share"] <= 0.25
    assert summary["format_after"]["share"] >= 0.75, summary["format_after"]
    assert summary["final_val_loss"] < 2.0
    report = (out / "sft_report.md").read_text()
    assert "well-formed answers after SFT" in report and (out / "checkpoints" / "latest").exists()
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["step"] for e in evals] == [30, 60] and len(evals[-1]["samples"]) == 2


def test_gsm8k_rows_become_chats_with_well_formed_answers(shared_data):
    conversations = read_conversations(shared_data / "gsm8k" / "test.jsonl")
    assert len(conversations) == 1319
    assert [m["role"] for m in conversations[0]] == ["user", "assistant"]
    assert all(is_well_formed_gsm8k(reference_answer(c)) for c in conversations)
    assert reference_answer(conversations[0]).endswith("#### 18")

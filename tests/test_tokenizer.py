import json
import random
from pathlib import Path

import numpy as np
import pytest

from lathe.config import TokenizerConfig
from lathe.errors import LatheError
from lathe.rundir import RunDir
from lathe.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    encode_shards,
    load_meta,
    load_tokens,
    shard_dtype,
    train_tokenizer,
    train_tokenizer_stage,
)

LATHE_DIR = Path(__file__).resolve().parents[1] / "lathe"

TRICKY = [
    "",
    " ",
    "hello world",
    "  leading and trailing  ",
    "tabs\tand\t\ttabs\n\tindented\n",
    "whitespace runs:     \n\n\n   \t \r\n end",
    "digits 0123456789 and 3.14159 and -42 and 1e10",
    "emoji 🙂👍🏽👨‍👩‍👧 and flags 🇫🇷",
    "CJK 中文字符 日本語のテキスト 한국어",
    "accents: café naïve Ærøskøbing, combining e\u0301",
    "zero width\u200b joiner\u200d and nbsp\u00a0here",
    "control \x00\x01\x7f chars and \ufeff BOM",
    "specials typed by users: <|bos|> <|user_start|>hi<|user_end|> <|eos|>",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "ÿþ rare Latin-1 ¬®¡",
]


def corpus() -> list[str]:
    """The package's own source: real, varied text, big enough for a few hundred merges."""
    return [p.read_text(encoding="utf-8") for p in sorted(LATHE_DIR.rglob("*.py"))]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(corpus(), TokenizerConfig(vocab_size=512))


def random_strings(n: int, seed: int = 0) -> list[str]:
    pools = ["abc xyz", "0123456789", " \t\n", "éüß", "中文日本", "🙂👍🏽🇫🇷", "<|>_", "\u200b\u0301"]
    rng = random.Random(seed)
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 40))) for _ in range(n)]


# --- the tokenizer -------------------------------------------------------------------------------
def test_round_trip_is_lossless(tok):
    for s in TRICKY + random_strings(300):
        assert tok.decode(tok.encode(s)) == s, repr(s)


def test_encode_batch_matches_encode(tok):
    texts = TRICKY + random_strings(50, seed=1)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_digits_are_split_one_per_token(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5
    assert [tok.decode([i]) for i in ids] == list("12345")


def test_split_digits_off_lets_numbers_merge():
    texts = ["1234 5678 " * 50, "1234 99 " * 50]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=1, split_digits=False))
    assert len(tok.encode("1234")) < 4


def test_special_tokens_have_ids_0_to_12(tok):
    assert len(SPECIAL_TOKENS) == 13
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.special_id(s) == i
        assert tok.hf.id_to_token(i) == s
        assert tok.decode([i]) == s
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.special_id("assistant_end") == SPECIAL_TOKENS.index("<|assistant_end|>")
    with pytest.raises(LatheError, match="unknown special token"):
        tok.special_id("<|nope|>")


def test_special_strings_in_user_text_stay_text(tok):
    text = "a<|bos|>b<|user_start|>"
    ids = tok.encode(text)
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tok.decode(ids) == text
    trusted = tok.encode(text, allow_special=True)
    assert tok.bos_id in trusted and tok.special_id("user_start") in trusted
    assert tok.decode(trusted) == text


def test_decode_can_skip_specials(tok):
    ids = [tok.bos_id] + tok.encode("hi there") + [tok.eos_id]
    assert tok.decode(ids) == "<|bos|>hi there<|eos|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi there"
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "<|bos|>hi there<|eos|>"


def test_vocab_size_is_respected(tok):
    assert tok.vocab_size == 512
    assert max(max(tok.encode(t), default=0) for t in corpus()) < 512


def test_small_corpus_gives_fewer_tokens_with_a_warning(capsys):
    tok = train_tokenizer(["tiny text"], TokenizerConfig(vocab_size=1000, min_frequency=1))
    assert len(SPECIAL_TOKENS) + 256 <= tok.vocab_size < 1000
    assert "only supports" in capsys.readouterr().err


def test_max_train_bytes_limits_the_training_text():
    texts = ["ab " * 100, "xy " * 1000]  # the first text is 300 bytes
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=2, max_train_bytes=300))
    assert len(tok.encode("ab")) == 1
    assert len(tok.encode("xy")) == 2  # never seen: no merge learned


def test_no_text_is_an_error():
    with pytest.raises(LatheError, match="no text"):
        train_tokenizer([], TokenizerConfig())


def test_token_bytes_sum_to_utf8_length(tok):
    table = tok.token_bytes()
    assert table.shape == (tok.vocab_size,)
    assert (table[: len(SPECIAL_TOKENS)] == 0).all() and (table[len(SPECIAL_TOKENS):] > 0).all()
    for s in TRICKY + random_strings(100, seed=2):
        ids = [tok.bos_id] + tok.encode(s) + [tok.eos_id]
        assert table[ids].sum() == len(tok.decode(ids, skip_special_tokens=True).encode("utf-8"))


def test_save_and_load(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.from_file(path)
    assert loaded.vocab_size == tok.vocab_size
    for s in TRICKY:
        assert loaded.encode(s) == tok.encode(s)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp files left


def test_load_errors(tmp_path):
    with pytest.raises(LatheError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LatheError, match="not a valid tokenizer"):
        Tokenizer.from_file(bad)


def test_foreign_tokenizer_is_rejected(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models
    path = tmp_path / "other.json"
    HFTokenizer(models.BPE({"a": 0, "b": 1}, [])).save(str(path))
    with pytest.raises(LatheError, match="not a lathe tokenizer"):
        Tokenizer.from_file(path)


def test_transformers_loads_the_same_tokenizer(tok, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers (extra 'hf') not installed")
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for s in [t for t in TRICKY if "<|" not in t]:
        ids = tok.encode(s)
        assert hf.encode(s, add_special_tokens=False) == ids, repr(s)
        assert hf.decode(ids, clean_up_tokenization_spaces=False) == s


# --- the stage and the shards --------------------------------------------------------------------
DOCS = {
    "train": corpus()[:6] + TRICKY[1:],
    "val": ["validation doc 123", "<|bos|> typed by a user", "🙂"],
    "test": [],
}


def make_run(tmp_path, docs=DOCS) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.data.mkdir(parents=True)
    for split, texts in docs.items():
        rows = [{"id": str(i), "source": "t", "text": t} for i, t in enumerate(texts)]
        run.split_file(split).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return run


def split_on_bos(tokens: np.ndarray, bos: int) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == bos)
    return np.split(tokens, starts[1:]) if starts.size else []


def test_stage_trains_encodes_and_round_trips(tmp_path):
    run = make_run(tmp_path)
    tok = train_tokenizer_stage(run, TokenizerConfig(vocab_size=400))
    assert run.tokenizer.exists() and Tokenizer.from_file(run.tokenizer).vocab_size == tok.vocab_size
    meta = encode_shards(run, tok)
    assert meta == load_meta(run)
    assert meta["dtype"] == "uint16" and meta["bos_id"] == tok.bos_id == 0
    for split, texts in DOCS.items():
        tokens = load_tokens(run, split)
        assert tokens.dtype == np.uint16 and not tokens.flags.writeable
        stats = meta["splits"][split]
        assert stats == {"tokens": len(tokens), "documents": len(texts),
                         "bytes": sum(len(t.encode("utf-8")) for t in texts)}
        docs = split_on_bos(np.asarray(tokens), tok.bos_id)
        assert [tok.decode(d[1:]) for d in docs] == texts
        assert tok.decode(tokens) == "".join("<|bos|>" + t for t in texts)
        assert tok.token_bytes()[np.asarray(tokens)].sum() == stats["bytes"]


def test_shards_are_streamed_in_batches(tmp_path, monkeypatch):
    import lathe.tokenizer as mod
    monkeypatch.setattr(mod, "_BATCH_DOCS", 2)
    run = make_run(tmp_path)
    tok = train_tokenizer_stage(run, TokenizerConfig(vocab_size=400))
    encode_shards(run, tok)
    texts = DOCS["train"]
    assert np.array_equal(load_tokens(run, "train"), np.concatenate([[0] + tok.encode(t) for t in texts]))


def test_shard_dtype():
    assert shard_dtype(512) == np.uint16
    assert shard_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert shard_dtype(65537) == np.uint32


def test_load_tokens_errors(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(LatheError, match="lathe tokenizer"):
        load_tokens(run, "train")
    encode_shards(run, train_tokenizer_stage(run, TokenizerConfig(vocab_size=300)))
    with pytest.raises(LatheError, match="no split 'dev'"):
        load_tokens(run, "dev")
    with open(run.token_file("val"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(LatheError, match="rerun"):
        load_tokens(run, "val")


def test_missing_or_bad_data_is_a_clear_error(tmp_path):
    run = RunDir(tmp_path / "empty")
    with pytest.raises(LatheError, match="lathe data"):
        train_tokenizer_stage(run, TokenizerConfig())
    run = make_run(tmp_path)
    run.split_file("train").write_text('{"text": "ok"}\n{"oops": 1}\n')
    with pytest.raises(LatheError, match=r"train.jsonl:2"):
        train_tokenizer_stage(run, TokenizerConfig())


def test_retraining_invalidates_old_shards(tmp_path):
    run = make_run(tmp_path)
    encode_shards(run, train_tokenizer_stage(run, TokenizerConfig(vocab_size=300)))
    train_tokenizer_stage(run, TokenizerConfig(vocab_size=400))
    assert not (run.tokens / "meta.json").exists()

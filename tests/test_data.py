"""The data stage: cleaning rules, filters and their manifest counts, hash splits, bad input, default corpus."""

import hashlib
import json
from pathlib import Path

import pytest

from lathe.config import DataConfig
from lathe.data import clean_text, default_sources, prepare_data, read_split
from lathe.data import pipeline as data_pipeline
from lathe.data.pipeline import Doc, assign_splits
from lathe.errors import LatheError
from lathe.rundir import RunDir

SPLITS = ("train", "val", "test")


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def letters(k: int) -> str:
    """k in base 26 as letters: 0 -> 'a', 27 -> 'bb'."""
    out = ""
    while True:
        k, r = divmod(k, 26)
        out = chr(97 + r) + out
        if not k:
            return out


def words(i: int, n: int = 12) -> str:
    """A distinct document of about n words. Distinct in letters, not only digits: near-dedup normalizes
    every number to 0, so 'word1_3' and 'word2_3' would be the same shingle."""
    return " ".join(f"w{letters(i)}x{letters(j)}" for j in range(n))


def cfg(sources, **kw) -> DataConfig:
    kw.setdefault("min_chars", 1)
    return DataConfig(sources=[str(s) for s in sources], **kw)


def all_rows(run: RunDir) -> list[dict]:
    return [r for s in SPLITS for r in read_split(run, s)]


# --- cleaning -----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, clean", [
    ("a\r\nb\rc", "a\nb\nc"),  # line endings
    ("a   \nb\t\n", "a\nb"),  # trailing whitespace, trailing newline
    ("a\n\n\n\n\nb", "a\n\n\nb"),  # 4 blank lines -> 2
    ("a\n \n\t\n  \nb", "a\n\n\nb"),  # whitespace-only lines count as blank
    ("a\n\n\nb", "a\n\n\nb"),  # 2 blank lines stay
    ("\n\n  \n  x = 1\n\n", "  x = 1"),  # leading/trailing blank lines go, indentation stays
    ("a\x00b\x07c\x1bd\x7fe\x85f", "abcdef"),  # control characters dropped
    ("\tif x:\n\t\treturn", "\tif x:\n\t\treturn"),  # tabs kept, not expanded
    ("\ufeffhello", "hello"),  # byte-order mark
    ("cafe\u0301", "caf\u00e9"),  # NFC: e + combining acute -> é
])
def test_clean_rules(raw, clean):
    assert clean_text(raw) == clean
    assert clean_text(clean) == clean  # idempotent


# --- filters ------------------------------------------------------------------------------------
def test_dedup_removes_planted_duplicates_across_sources(tmp_path):
    docs = [words(i) for i in range(5)]
    for i, d in enumerate(docs):
        write(tmp_path / "a" / f"{i}.txt", d)
    write(tmp_path / "b" / "copy.md", "\r\n" + docs[0] + "  \r\n\r\n")  # the same text after cleaning
    write(tmp_path / "b" / "rows.jsonl", "\n".join(json.dumps({"text": t}) for t in [docs[1], docs[1], "fresh one"]))
    m = prepare_data(cfg([tmp_path / "a", tmp_path / "b"]), RunDir(tmp_path / "run"))

    texts = sorted(r["text"] for r in all_rows(RunDir(tmp_path / "run")))
    assert texts == sorted(docs + ["fresh one"])
    assert m["sources"]["b"]["removed"]["duplicate"]["documents"] == 3
    assert m["sources"]["a"]["removed"]["duplicate"]["documents"] == 0
    assert m["totals"]["removed"]["duplicate"]["bytes"] == len(docs[0]) + 2 * len(docs[1])
    assert m["totals"]["documents"] == sum(m["splits"][s]["documents"] for s in SPLITS) == 6


def test_length_filters_and_manifest_counts(tmp_path):
    lengths = [3, 9, 10, 30, 50, 51, 200]
    for n in lengths:
        write(tmp_path / "d" / f"{n:03d}.txt", "x" * (n - 3) + f"{n:03d}")
    m = prepare_data(cfg([tmp_path / "d"], min_chars=10, max_chars=50), RunDir(tmp_path / "run"))

    kept = sorted(len(r["text"]) for r in all_rows(RunDir(tmp_path / "run")))
    assert kept == [10, 30, 50]
    removed = m["sources"]["d"]["removed"]
    assert removed["too_short"] == {"files": 0, "documents": 2, "bytes": 3 + 9}
    assert removed["too_long"] == {"files": 0, "documents": 2, "bytes": 51 + 200}
    assert m["sources"]["d"]["files_read"] == 7 and m["sources"]["d"]["documents"] == 3
    assert m["sources"]["d"]["bytes"] == 90
    assert sum(m["splits"][s]["chars"] for s in SPLITS) == 90
    assert m["config"]["min_chars"] == 10


def test_max_total_bytes_samples_every_source_and_counts_what_is_left(tmp_path):
    for src in ("p", "q"):
        for i in range(10):
            write(tmp_path / src / f"{i}.txt", f"{src}{i}".ljust(100, "z"))  # 100 bytes each
    m = prepare_data(cfg([tmp_path / "p", tmp_path / "q"], max_total_bytes=450), RunDir(tmp_path / "run"))

    assert m["budget_reached"] and m["totals"]["bytes"] == 400 <= 450
    assert {r["source"] for r in all_rows(RunDir(tmp_path / "run"))} == {"p", "q"}  # shared by sources
    assert m["budget"]["shares"] == {"p": 225, "q": 225} and m["budget"]["selected_bytes"] == 400
    left = m["totals"]["removed"]["over_max_total_bytes"]
    # each source takes 2 files (200 of its 225 bytes); the 3rd would overflow: it and the rest are not read
    assert left == {"files": 16, "documents": 0, "bytes": 16 * 100}


# --- splits -------------------------------------------------------------------------------------
def split_files(run: RunDir) -> dict[str, bytes]:
    return {s: run.split_file(s).read_bytes() for s in SPLITS}


def test_split_is_deterministic_and_independent_of_input_order(tmp_path):
    for i in range(40):
        write(tmp_path / ("a" if i % 2 else "b") / f"{i:02d}.txt", words(i))
    kw = dict(val_fraction=0.2, test_fraction=0.2)
    runs = [RunDir(tmp_path / f"run{k}") for k in range(3)]
    prepare_data(cfg([tmp_path / "a", tmp_path / "b"], **kw), runs[0])
    prepare_data(cfg([tmp_path / "a", tmp_path / "b"], **kw), runs[1])
    prepare_data(cfg([tmp_path / "b", tmp_path / "a"], **kw), runs[2])

    assert split_files(runs[0]) == split_files(runs[1]) == split_files(runs[2])
    for s in SPLITS:
        rows = list(read_split(runs[0], s))
        assert rows, f"{s} is empty"
        for r in rows:  # the documented rule, recomputed here
            h = hashlib.sha256(r["text"].encode()).hexdigest()
            u = int(h[:8], 16) / 2**32
            assert r["id"] == h[:16]
            assert s == ("val" if u < 0.2 else "test" if u < 0.4 else "train")


def test_no_split_left_empty_with_three_documents():
    docs = [Doc(hashlib.sha256(bytes([i])).hexdigest(), "s", str(i)) for i in range(3)]
    splits = assign_splits(docs, 0.0001, 0.0001)  # by hash alone all three would go to train
    assert [len(splits[s]) for s in SPLITS] == [1, 1, 1]
    smallest = sorted(d.hash for d in docs)
    assert splits["val"][0].hash == smallest[0] and splits["test"][0].hash == smallest[1]
    assert assign_splits(docs, 0.0, 0.0) == {"train": sorted(docs, key=lambda d: d.hash), "val": [], "test": []}


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("line, problem", [
    ('{"text": "ok", ', "not valid JSON"),
    ('["text"]', "expected a JSON object, got list"),
    ('{"body": "x"}', "no 'text' field"),
    ('{"text": 42}', "field 'text' is int"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, problem):
    path = write(tmp_path / "d" / "rows.jsonl", '{"text": "first document"}\n' + line + "\n")
    with pytest.raises(LatheError) as e:
        prepare_data(cfg([path]), RunDir(tmp_path / "run"))
    assert f"{path}:2" in str(e.value) and problem in str(e.value)


def test_jsonl_text_field_and_blank_lines(tmp_path):
    path = write(tmp_path / "rows.jsonl", '{"body": "one doc"}\n\n{"body": "two doc", "n": 1}\n')
    prepare_data(cfg([path], text_field="body"), RunDir(tmp_path / "run"))
    rows = all_rows(RunDir(tmp_path / "run"))
    assert sorted(r["text"] for r in rows) == ["one doc", "two doc"] and {r["source"] for r in rows} == {"rows.jsonl"}


def test_empty_folder_and_missing_source_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    write(tmp_path / "other" / "table.csv", "a,b\n1,2\n")
    for src in ("empty", "other"):
        with pytest.raises(LatheError, match="no readable files with extensions"):
            prepare_data(cfg([tmp_path / src]), RunDir(tmp_path / "run"))
    with pytest.raises(LatheError, match="nope.txt does not exist"):
        prepare_data(cfg([tmp_path / "nope.txt"]), RunDir(tmp_path / "run"))
    with pytest.raises(LatheError, match="matched nothing"):
        prepare_data(cfg([tmp_path / "*.md"]), RunDir(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_only_binary_files_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data_pipeline, "warn", lambda msg: None)
    write(tmp_path / "bin" / "a.txt", b"\x00\x01\x02binary")
    write(tmp_path / "bin" / "b.py", b"\xff\xfe\x00x")
    with pytest.raises(LatheError, match="no documents") as e:
        prepare_data(cfg([tmp_path / "bin"]), RunDir(tmp_path / "run"))
    assert "binary_or_non_utf8 0 documents/2 files" in str(e.value)


def test_binary_and_non_utf8_files_are_skipped_and_named(tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(data_pipeline, "warn", warnings.append)
    for i in range(3):
        write(tmp_path / "d" / f"ok{i}.txt", words(i))
    binary = write(tmp_path / "d" / "image.txt", b"PNG\x00\x00\x1a\x00data")
    latin1 = write(tmp_path / "d" / "latin1.md", "caf\u00e9 cr\u00e8me".encode("latin-1"))
    m = prepare_data(cfg([tmp_path / "d"], on_decode_error="skip"), RunDir(tmp_path / "run"))

    assert len(warnings) == 2
    assert any(str(binary) in w and "binary" in w for w in warnings)
    assert any(str(latin1) in w and "not UTF-8" in w for w in warnings)
    src = m["sources"]["d"]
    assert sorted(s["file"] for s in src["skipped_files"]) == sorted([str(binary), str(latin1)])
    assert src["removed"]["binary_or_non_utf8"]["files"] == 2 and src["files_skipped"] == 2
    assert src["files_read"] == 3 and src["documents"] == 3
    assert sorted(r["text"] for r in all_rows(RunDir(tmp_path / "run"))) == sorted(words(i) for i in range(3))


def test_read_split_rejects_unknown_split(tmp_path):
    with pytest.raises(LatheError, match="unknown split"):
        next(read_split(RunDir(tmp_path), "dev"))
    with pytest.raises(LatheError, match="is missing"):
        next(read_split(RunDir(tmp_path), "train"))


# --- real corpora -------------------------------------------------------------------------------
def test_default_sources_are_stdlib_py_files(tmp_path):
    files = default_sources()
    assert len(files) > 100 and files == default_sources()  # deterministic
    # a spread of the library, not the head of the alphabet (which is all `_private` modules)
    assert len({Path(f).name[0] for f in files[:50]}) >= 10
    paths = [Path(f) for f in files]
    assert all(p.suffix == ".py" for p in paths)
    skipped = {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}
    assert not any(skipped & set(p.parts) for p in paths)
    assert any(p.name == "argparse.py" for p in paths)
    assert all(p.stat().st_size > 0 for p in paths[:10] if p.name != "__init__.py")

    m = prepare_data(DataConfig(max_total_bytes=30_000, min_chars=64), RunDir(tmp_path / "run"))
    assert list(m["sources"]) == ["python-stdlib"] and 0 < m["totals"]["bytes"] <= 30_000


def test_shared_text_corpora_give_three_sources(tmp_path, shared_data):
    m = prepare_data(DataConfig(sources=[str(shared_data / "text" / "*")], max_total_bytes=200_000),
                     RunDir(tmp_path / "run"))
    assert sorted(m["sources"]) == ["abc", "state_union", "webtext"]
    assert m["budget_reached"] and 0 < m["budget"]["selected_bytes"] <= 200_000 and m["totals"]["bytes"] > 0
    assert all(m["sources"][s]["documents"] > 0 for s in m["sources"])  # the budget is shared by sources
    assert all(m["splits"][s]["documents"] > 0 for s in SPLITS)
    assert json.loads((tmp_path / "run" / "data" / "manifest.json").read_text()) == m

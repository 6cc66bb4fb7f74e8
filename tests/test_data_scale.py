"""The data pipeline at scale: planted near-duplicates (precision and recall), filters, decontamination,
mixtures, determinism across tasks/processes/interpreters, bad input, bounded memory, cluster executors."""

import gzip
import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import dill
import numpy as np
import pytest

from lathe.config import DataConfig
from lathe.data import prepare_data, read_split
from lathe.data.clean import make_cleaner, text_hash
from lathe.data.dedup import lsh_params, signature_step
from lathe.data.dedup import simplify as dedup_simplify
from lathe.data.splits import copies, split_of
from lathe.errors import LatheError
from lathe.rundir import RunDir

SPLITS = ("train", "val", "test")
SOURCES = ("abc", "state_union", "webtext")
NO_PII = {"emails": False, "phones": False, "ips": False}


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def config(sources, **kw) -> DataConfig:
    return DataConfig.model_validate({"sources": [str(s) for s in sources]} | kw)


def rows(run: RunDir) -> list[dict]:
    return [r for s in SPLITS for r in read_split(run, s)]


def decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def shared_docs(shared_data: Path, per_source: int, chars: int) -> dict[str, list[str]]:
    """`per_source` documents of about `chars` characters (whole paragraphs) from each shared text source."""
    out = {}
    for src in SOURCES:
        docs, cur = [], ""
        for path in sorted((shared_data / "text" / src).glob("*.txt")):
            for para in re.split(r"\n\s*\n", decode(path.read_bytes())):
                cur += para.strip() + "\n\n"
                if len(cur) >= chars:
                    docs.append(cur.strip())
                    cur = ""
        out[src] = random.Random(src).sample(docs, per_source)
    return out


# --- near-duplicates ----------------------------------------------------------------------------
def near_copy(text: str, kind: int, rng: random.Random) -> str:
    """A planted near-duplicate (word 5-gram Jaccard similarity >= 0.9 with the original)."""
    words = text.split(" ")
    if kind == 0:  # 1% of the words changed
        for i in rng.sample(range(len(words)), max(1, len(words) // 100)):
            words[i] = "zq" + words[i][::-1]
        return " ".join(words)
    if kind == 1:  # a header and a footer
        return "Transcript prepared for the archive\n\n" + text + "\n\nEnd of transcript, all rights reserved"
    if kind == 2:  # case, punctuation and spacing
        return text.upper().replace(",", " ;").replace(". ", ".   ")
    if kind == 3:  # the last 5% cut off
        return " ".join(words[: len(words) * 95 // 100])
    return text  # an exact copy


def test_planted_near_duplicates_are_removed_and_unique_documents_kept(tmp_path, shared_data):
    docs = shared_docs(shared_data, per_source=40, chars=2500)
    rng = random.Random(0)
    for src, texts in docs.items():
        for i, text in enumerate(texts):
            write(tmp_path / "corpus" / src / f"{i:03d}.txt", text)
    originals = [(src, t) for src in SOURCES for t in docs[src]]
    planted = []  # (original, copy), each copy in another source than its original
    for j, (src, text) in enumerate(rng.sample(originals, 50)):
        other = SOURCES[(SOURCES.index(src) + 1 + j % 2) % 3]
        copy = near_copy(text, j % 5, rng)
        write(tmp_path / "corpus" / other / f"copy{j:03d}.txt", copy)
        planted.append((text, copy))
    # similar but distinct: halves of two different documents (Jaccard ~0.3 with each): must be kept
    mixed = []
    for j in range(10):
        (_, a), (_, b) = rng.sample(originals, 2)
        mixed.append(a[: len(a) // 2] + "\n\n" + b[len(b) // 2:])
        write(tmp_path / "corpus" / "webtext" / f"mixed{j:03d}.txt", mixed[-1])

    cfg = config([tmp_path / "corpus" / s for s in SOURCES], pii=NO_PII)
    m = prepare_data(cfg, RunDir(tmp_path / "run"))
    clean = make_cleaner(cfg.clean)  # outputs are the cleaned inputs
    kept = [r["text"] for r in rows(RunDir(tmp_path / "run"))]
    removed = m["totals"]["removed"]["duplicate"]["documents"] + m["totals"]["removed"]["near_duplicate"]["documents"]
    clusters = [{clean(o), clean(c)} for o, c in planted]
    caught = sum(1 for c in clusters if sum(t in c for t in kept) == 1)  # exactly one copy survived
    copied = set().union(*clusters)
    unique = [clean(t) for _, t in originals if clean(t) not in copied] + [clean(t) for t in mixed]
    unique_kept = sum(t in kept for t in unique)
    recall = caught / len(planted)
    precision = caught / removed if removed else 1.0
    print(f"\nnear-duplicates: {len(planted)} planted, {removed} removed; recall {recall:.3f}, precision "
          f"{precision:.3f}; unique documents kept {unique_kept}/{len(unique)}")
    assert recall >= 0.9 and precision >= 0.95  # at Jaccard 0.9 an LSH candidate has probability 0.95
    assert unique_kept == len(unique)  # no unique document (nor the half-and-half ones) was removed
    assert len(kept) == len(set(kept)) == len(originals) + len(planted) + len(mixed) - removed
    assert m["totals"]["removed"]["duplicate"]["documents"] == 10  # the exact copies (kind 4)
    card = (tmp_path / "run" / "data" / "card.md").read_text()
    assert "near_duplicate" in card and "duplicate of" in card  # examples name the copy that was kept


def test_fast_paths_give_the_libraries_results(shared_data):
    """lathe runs ftfy only on non-ASCII lines, datatrove's diacritics pass only on non-ASCII runs, and MinHash
    over blocks of shingles: each must give exactly what the library gives."""
    import ftfy
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
    from datatrove.utils.text import simplify_text

    import lathe.data.clean as clean_module
    from lathe.config import DedupConfig

    ours = signature_step("/nonexistent", DedupConfig())
    theirs = MinhashDedupSignature("/nonexistent", ours.config, language=ours.word_tokenizer)
    texts = [decode(p.read_bytes())[:20000] for p in sorted((shared_data / "text").glob("*/*.txt"))[::4]]
    texts += ["Café naïve Ångström — ﬁne “quotes” ½ e\u0301", "ASCII, 12.5 numbers!\n", "cafÃ© crÃ¨me\n\x1b[31mred\x1b[0m\r\n",
              "\n\nâ€œquotedâ€\x9d\n", " ".join(texts) * 2]  # the last: more shingles than a signature block
    clean_module.fix_unicode("é")
    for text in texts:
        assert clean_module.fix_unicode(text) == ftfy.fix_text(text, config=clean_module._FTFY_CONFIG)
        assert dedup_simplify(text, ours.config.norm_config) == simplify_text(text, ours.config.norm_config)
        shingles = ours.get_shingles(text)
        assert np.array_equal(shingles, theirs.get_shingles(text))
        if shingles.size:
            assert ours.get_signature(shingles) == theirs.get_signature(shingles)


def test_lsh_parameters_follow_the_threshold():
    from datasketch.lsh import _optimal_param

    from lathe.config import DedupConfig

    for t in (0.8, 0.9):
        assert lsh_params(DedupConfig(threshold=t)) == _optimal_param(t, 112, 0.5, 0.5)
    assert lsh_params(DedupConfig(bands=20, rows=5)) == (20, 5)
    with pytest.raises(ValueError):
        DedupConfig(bands=20)


# --- determinism --------------------------------------------------------------------------------
def test_outputs_identical_with_any_tasks_processes_or_interpreter(tmp_path, shared_data):
    """Same bytes with 1 task in-process, 4 tasks on 2 processes, and 3 tasks in a fresh interpreter with
    another hash seed and working directory: nothing depends on the machine."""
    sources = [str(shared_data / "text" / s) for s in SOURCES]
    base = dict(max_total_bytes=450_000, max_chars=4000, boilerplate={"enabled": True})
    prepare_data(config(sources, tasks=1, workers=1, **base), RunDir(tmp_path / "a"))
    prepare_data(config(sources, tasks=4, workers=2, **base), RunDir(tmp_path / "b"))
    script = textwrap.dedent(f"""
        import json
        from lathe.config import DataConfig
        from lathe.data import prepare_data
        from lathe.rundir import RunDir
        cfg = DataConfig.model_validate(json.loads({json.dumps(dict(sources=sources, tasks=3, workers=1, **base))!r}))
        prepare_data(cfg, RunDir({str(tmp_path / 'c')!r}))
    """)
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    outputs = {}
    for name in "abc":
        data = tmp_path / name / "data"
        manifest = json.loads((data / "manifest.json").read_text())
        outputs[name] = ({s: (data / f"{s}.jsonl").read_bytes() for s in SPLITS}, manifest["sources"], manifest["splits"])
    assert outputs["a"] == outputs["b"] == outputs["c"]
    splits, sources_counts, _ = outputs["a"]
    assert all(splits[s] for s in SPLITS) and all(v["documents"] > 10 for v in sources_counts.values())
    for s in SPLITS:  # the documented split rule, recomputed
        for line in splits[s].decode().splitlines():
            row = json.loads(line)
            assert s == split_of(text_hash(row["text"]), 0.05, 0.05) and row["id"] == text_hash(row["text"])[:16]


# --- filters, PII, boilerplate, decontamination -------------------------------------------------
PROSE = ("The committee met on Tuesday to discuss the budget for the coming year, and the members agreed "
         "that the plan should be published before the end of the month. ")


def letters(k: int) -> str:
    return (letters(k // 26 - 1) if k >= 26 else "") + chr(97 + k % 26)


def bad_pages(good: list[str]) -> dict[str, dict[str, str]]:
    """Pages each filter must remove (it alone is on), with the rule that should fire."""
    words = good[0].split()
    return {
        "gopher_repetition": {"dup_line_frac": "\n".join(["Buy cheap tickets now, best prices online today."] * 40)},
        "gopher_quality": {"gopher_short_doc": " ".join(words[:30]),
                           "gopher_enough_stop_words": " ".join(f"w{letters(i)}k" for i in range(120)) + "."},
        "c4": {"lorem_ipsum": good[1] + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
               "curly_bracket": good[2] + "\nThe function body is { return 1; } in this language."},
        "fineweb": {"line_punct_ratio": "\n".join(" ".join(words[i:i + 3]).strip(".,;:!?") for i in range(0, 60, 3))},
    }


@pytest.mark.parametrize("name", ["gopher_repetition", "gopher_quality", "c4", "fineweb"])
def test_quality_filters_remove_what_they_claim(tmp_path, shared_data, name):
    good = shared_docs(shared_data, per_source=6, chars=3000)["state_union"]
    bad = bad_pages(good)[name]
    for i, text in enumerate(good[3:]):
        write(tmp_path / "web" / f"good{i}.txt", text)
    for rule, text in bad.items():
        write(tmp_path / "web" / f"{rule}.txt", text)
    m = prepare_data(config([tmp_path / "web"], filters={name: {"enabled": True}}, pii=NO_PII), RunDir(tmp_path / "run"))

    assert m["totals"]["documents"] == len(good) - 3  # every good page kept (C4 may trim lines of them)
    removed = {r: v for r, v in m["sources"]["web"]["removed"].items() if v["documents"]}
    assert list(removed) == [name] and removed[name]["details"] == dict.fromkeys(bad, 1)
    card = (tmp_path / "run" / "data" / "card.md").read_text()
    assert all(rule in card for rule in bad) and f"Filter {name}: on" in card


def test_language_filter_without_a_local_model_is_skipped_and_said(tmp_path, shared_data):
    for i, text in enumerate(shared_docs(shared_data, per_source=3, chars=500)["abc"]):
        write(tmp_path / "d" / f"{i}.txt", text)
    cfg = config([tmp_path / "d"], filters={"language": {"enabled": True}})
    m = prepare_data(cfg, RunDir(tmp_path / "run"))
    assert m["totals"]["documents"] == 3
    card = json.loads((tmp_path / "run" / "data" / "card.json").read_text())
    assert card["filters"]["language"]["status"].startswith("skipped: no local model")


def test_pii_is_replaced_and_counted(tmp_path):
    text = (PROSE + "Write to jane.doe@example.com or call (555) 123-4567 or +44 20 7946 0958; the server is "
            "at 8.8.8.8 and the router at 192.168.0.1. Years 1945-1946 and version 3.11.2 stay.")
    write(tmp_path / "d" / "a.txt", text)
    m = prepare_data(config([tmp_path / "d"]), RunDir(tmp_path / "run"))
    [row] = rows(RunDir(tmp_path / "run"))
    assert "<EMAIL>" in row["text"] and row["text"].count("<PHONE>") == 2 and "<IP>" in row["text"]
    assert "192.168.0.1" in row["text"] and "1945-1946" in row["text"] and "3.11.2" in row["text"]
    assert "jane.doe" not in row["text"] and "8.8.8.8" not in row["text"]
    assert {k: m["sources"]["d"]["counts"][f"pii_{k}"] for k in ("email", "phone", "ip")} == \
        {"email": 1, "phone": 2, "ip": 1}


def test_boilerplate_headers_and_footers_are_removed(tmp_path, shared_data):
    bodies = shared_docs(shared_data, per_source=12, chars=1200)["abc"]
    header, footer = "ABC Rural News - www.example.org/rural", "Copyright 2005 Example Broadcasting. All rights reserved."
    for i, body in enumerate(bodies):
        write(tmp_path / "news" / f"{i:02d}.txt", f"{header}\n\n{body}\n\n{footer}")
    write(tmp_path / "news" / "only.txt", f"{header}\n{footer}\nok")  # nothing left but 'ok'
    cfg = config([tmp_path / "news"], pii=NO_PII, boilerplate={"enabled": True, "min_docs": 5})
    m = prepare_data(cfg, RunDir(tmp_path / "run"))

    kept = rows(RunDir(tmp_path / "run"))
    assert len(kept) == len(bodies)
    assert not any(header in r["text"] or footer in r["text"] for r in kept)
    assert {r["text"] for r in kept} == {make_cleaner(cfg.clean)(b) for b in bodies}
    src = m["sources"]["news"]
    assert src["counts"]["boilerplate_lines_removed"] == 2 * (len(bodies) + 1)
    assert src["removed"]["too_short_after_boilerplate"]["documents"] == 1
    card = json.loads((tmp_path / "run" / "data" / "card.json").read_text())
    assert card["boilerplate"]["lines"]["news"] == sorted([header, footer])


def test_decontamination_removes_documents_with_test_set_ngrams(tmp_path, shared_data):
    questions = [json.loads(line)["question"] for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]]
    docs = shared_docs(shared_data, per_source=6, chars=1500)["state_union"]
    for i, d in enumerate(docs):
        write(tmp_path / "d" / f"{i}.txt", d + ("\n\nHomework: " + questions[i] if i < 3 else ""))
    cfg = config([tmp_path / "d"], pii=NO_PII,
                 decontaminate={"sets": [{"path": str(shared_data / "gsm8k" / "test.jsonl"), "fields": ["question"]}]})
    m = prepare_data(cfg, RunDir(tmp_path / "run"))
    kept = {r["text"] for r in rows(RunDir(tmp_path / "run"))}
    assert kept == {make_cleaner(cfg.clean)(d) for d in docs[3:]}
    assert m["sources"]["d"]["removed"]["contaminated"] == {
        "files": 0, "documents": 3, "bytes": m["sources"]["d"]["removed"]["contaminated"]["bytes"],
        "details": {"test.jsonl": 3}}


# --- mixtures -----------------------------------------------------------------------------------
def test_mixture_weights_thin_and_repeat_sources_by_the_hash_rule(tmp_path, shared_data):
    docs = shared_docs(shared_data, per_source=30, chars=800)
    for src in ("abc", "webtext"):
        for i, d in enumerate(docs[src]):
            write(tmp_path / src / f"{i}.txt", d)
    sources = [{"path": str(tmp_path / "abc"), "weight": 2.5}, {"path": str(tmp_path / "webtext"), "weight": 0.5}]
    cfg = DataConfig.model_validate({"sources": sources, "pii": NO_PII, "val_fraction": 0.2, "test_fraction": 0.1})
    m = prepare_data(cfg, RunDir(tmp_path / "run"))

    clean = make_cleaner(cfg.clean)
    for src, weight in (("abc", 2.5), ("webtext", 0.5)):
        for split in SPLITS:  # the documented rule, recomputed from the inputs
            want = sum(copies(h, weight, split) for d in docs[src]
                       if split_of(h := text_hash(clean(d)), 0.2, 0.1) == split)
            got = sum(r["source"] == src for r in read_split(RunDir(tmp_path / "run"), split))
            assert got == want, (src, split)
    train = m["sources"]["abc"]["steps"]["split_train"]
    assert train["documents"] > 2 * m["sources"]["abc"]["steps"]["final"]["documents"] * 0.7 * 0.9  # repeats
    assert m["sources"]["webtext"]["removed"]["mixture_downsampled"]["documents"] > 0
    card = (tmp_path / "run" / "data" / "card.md").read_text()
    assert "share of train tokens" in card and "| 2.5 |" in card and "UTF-8 bytes / 4" in card


# --- bad input ----------------------------------------------------------------------------------
def test_bad_input_is_skipped_or_cut_with_a_named_reason(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "d"
    rows_ = [json.dumps({"text": f"{PROSE} Row {chr(97 + i % 26)}{chr(97 + i // 26)}."}) for i in range(300)]
    packed = gzip.compress(("\n".join(rows_) + "\n").encode())
    write(d / "truncated.jsonl.gz", packed[: len(packed) // 2])
    write(d / "not_gzip.jsonl.gz", b"plain text pretending\n" * 20)
    write(d / "garbage.parquet", b"PAR1" + bytes(random.Random(0).randrange(256) for _ in range(3000)))
    pq.write_table(pa.table({"text": [PROSE + "one", None, PROSE + "two"]}), d / "with_null.parquet")
    write(d / "one_line.txt", b"y" * (50 << 20))  # a 50 MB single line
    write(d / "good.txt", PROSE)
    cfg = config([d], on_bad_record="skip", dedup={"near": False})
    m = prepare_data(cfg, RunDir(tmp_path / "run"))

    src = m["sources"]["d"]
    problems = {Path(p["file"]).name: p for p in json.loads((tmp_path / "run" / "data" / "card.json").read_text())
                ["sources"]["d"]["problems"]}
    assert "truncated or corrupt gzip stream after line" in problems["truncated.jsonl.gz"]["reason"]
    assert "not a gzip file" in problems["not_gzip.jsonl.gz"]["reason"]
    assert "not a valid parquet file" in problems["garbage.parquet"]["reason"]
    assert "row 2: column 'text' is NoneType" in problems["with_null.parquet"]["reason"]
    assert src["removed"]["unreadable"]["files"] == 2 and src["files_skipped"] == 2
    assert src["removed"]["bad_record"]["documents"] == 1
    assert src["removed"]["too_long"] == {"files": 0, "documents": 1, "bytes": 50 << 20}
    kept_rows = int(problems["truncated.jsonl.gz"]["reason"].split("after line ")[1].split()[0])
    # every input document is accounted for: kept, or counted where it was removed
    assert src["documents"] == 1 + 2 + kept_rows
    assert m["totals"]["documents"] == sum(m["splits"][s]["documents"] for s in SPLITS)


def test_invalid_utf8_is_repaired_replaced_or_skipped_and_counted(tmp_path, monkeypatch):
    from lathe.data import pipeline

    monkeypatch.setattr(pipeline, "warn", lambda msg: None)
    write(tmp_path / "d" / "latin.txt", "Le café crème était très bon, dit la façade naïve. ".encode("cp1252") * 2)
    # UTF-8 and cp1252 in one file (a common accident when files are concatenated)
    write(tmp_path / "d" / "mixed.txt", "Déjà vu, à la carte: ".encode() + "Ça coûte vingt-cinq €, hélas.".encode("cp1252"))
    expect = {"repair": ["Le café crème était", "Déjà vu, à la carte: Ça coûte vingt-cinq €, hélas."],
              "replace": ["Le caf\ufffd cr\ufffdme \ufffdtait", "Déjà vu, à la carte: \ufffda co\ufffdte"]}
    for policy, wanted in expect.items():
        m = prepare_data(config([tmp_path / "d"], on_decode_error=policy), RunDir(tmp_path / policy))
        texts = [r["text"] for r in rows(RunDir(tmp_path / policy))]
        assert all(any(w in t for t in texts) for w in wanted), texts
        counts = m["sources"]["d"]["counts"]
        assert counts[f"files_{policy}ed" if policy == "repair" else "files_replaced"] == 2
        assert counts[f"bytes_{policy}ed" if policy == "repair" else "bytes_replaced"] == 2 * 6 + 4
    with pytest.raises(LatheError, match="binary_or_non_utf8 0 documents/2 files"):
        prepare_data(config([tmp_path / "d"], on_decode_error="skip"), RunDir(tmp_path / "skip"))


def test_malformed_parquet_column_is_an_error_naming_file_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x" * 100]}), write(tmp_path / "t.parquet", b""))
    with pytest.raises(LatheError, match=r"t\.parquet: no 'text' column \(columns: body"):
        prepare_data(config([tmp_path / "t.parquet"]), RunDir(tmp_path / "run"))


# --- formats and sources ------------------------------------------------------------------------
def test_html_jsonl_gz_parquet_and_url_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "d"
    article = " ".join([PROSE] * 3)
    write(d / "page.html", f"<html><body><nav>Home | About | Contact</nav><article><h1>Budget</h1><p>{article}</p>"
                           "</article><footer>(c) 2024 Example</footer></body></html>")
    write(d / "script.html", "<html><head><style>p {}</style></head><body><script>main()</script></body></html>")
    write(d / "rows.jsonl.gz", gzip.compress(json.dumps({"text": "gzip " + PROSE}).encode() + b"\n"))
    pq.write_table(pa.table({"text": ["parquet " + PROSE.replace("budget", "harvest")]}), d / "rows.parquet")
    m = prepare_data(config([d], dedup={"near": False}), RunDir(tmp_path / "local"))
    texts = sorted(r["text"] for r in rows(RunDir(tmp_path / "local")))
    assert len(texts) == 3 and any(t.startswith("gzip ") for t in texts) and any(t.startswith("parquet ") for t in texts)
    html = next(t for t in texts if "committee" in t and not t.startswith(("gzip", "parquet")))
    assert "Home | About" not in html and "(c) 2024" not in html
    assert m["sources"]["d"]["removed"]["html_no_text"]["documents"] == 1
    # the same folder through fsspec (file://), as for s3:// or hf://datasets/... with the network
    prepare_data(config([f"file://{d}"], dedup={"near": False}), RunDir(tmp_path / "url"))
    assert [r["text"] for r in rows(RunDir(tmp_path / "url"))] == [r["text"] for r in rows(RunDir(tmp_path / "local"))]


# --- bounded memory -----------------------------------------------------------------------------
MEMORY_SCRIPT = """
import json, resource, sys
import io, matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
plt.plot([1, 2]); plt.savefig(io.BytesIO()); plt.close()  # one-time library setup (fonts, BLAS buffers) up front
from lathe.config import DataConfig
from lathe.data import prepare_data
from lathe.rundir import RunDir
def status(field):  # bytes, from /proc (ru_maxrss would include the parent's memory from before exec)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
rss = status("VmHWM")
limit = status("VmSize") + {headroom}
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
m = prepare_data(DataConfig.model_validate(json.loads(sys.argv[1])), RunDir(sys.argv[2]))
print(json.dumps({{"documents": m["totals"]["documents"], "too_long": m["totals"]["removed"]["too_long"],
                  "rss_after_imports": rss, "peak_rss": status("VmHWM")}}))
"""


def test_corpus_far_larger_than_the_memory_limit_streams_through(tmp_path, shared_data):
    """A 160 MB corpus through the pipeline with its address space capped at 32 MB above the interpreter's
    after imports: 8 MB of text in a single file (split into documents as it streams) and a .jsonl.gz
    with 3 MB of text go through every stage; a 50 MB single line and 100 MB of over-long .jsonl documents
    are read and counted as too long, the line without ever being held whole."""
    headroom = 32 << 20
    text = "\n\n".join(decode(p.read_bytes()) for p in sorted((shared_data / "text").glob("*/*.txt")))
    rng = random.Random(0)
    (tmp_path / "big").mkdir()
    with open(tmp_path / "big" / "book.txt", "w") as f:
        f.write(text)
    with gzip.open(tmp_path / "big" / "rows.jsonl.gz", "wt", compresslevel=1) as f:
        for para in [p for p in text.split("\n\n") if p.strip()][::3]:
            words = para.split()
            f.write(json.dumps({"text": " ".join(rng.sample(words, len(words)))}) + "\n")
    write(tmp_path / "big" / "line.txt", b"z" * (50 << 20))
    with open(tmp_path / "big" / "long.jsonl", "w") as f:
        for i in range(500):
            f.write(json.dumps({"text": "w" * 200_000}) + "\n")
    corpus = sum(p.stat().st_size for p in (tmp_path / "big").iterdir())
    assert corpus > 4.5 * headroom, corpus

    cfg = {"sources": [str(tmp_path / "big")], "tasks": 2, "workers": 1}
    # the cap is on address space, so keep libraries from reserving large virtual regions per thread
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT.format(headroom=headroom), json.dumps(cfg),
                          str(tmp_path / "run")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nmemory: corpus {corpus / 1e6:.0f} MB, address space limit +{headroom >> 20} MB over the "
          f"interpreter's; resident memory {result['rss_after_imports'] / 1e6:.0f} MB after imports, "
          f"{result['peak_rss'] / 1e6:.0f} MB at peak")
    assert result["too_long"]["documents"] >= 501 and result["documents"] > 500


# --- cluster executors --------------------------------------------------------------------------
def test_slurm_and_ray_executors_get_the_same_pipeline(tmp_path, monkeypatch):
    """No Slurm here: the Slurm executors are built, pickled as datatrove ships them to the jobs, unpickled,
    and their pipelines run task by task in order: the output equals a local run's."""
    from lathe.data import executors as data_executors
    from lathe.data.executors import build_stages, make_executors

    for i in range(30):
        write(tmp_path / "d" / f"{i}.txt", f"{PROSE} Note {chr(97 + i % 26)}{chr(97 + i // 26)}." * (1 + i % 3))
    local = config([tmp_path / "d"], tasks=3, pii=NO_PII)
    prepare_data(local, RunDir(tmp_path / "local"))

    cfg = local.model_copy(update={"executor": "slurm", "slurm": local.slurm.model_copy(
        update={"partition": "cpu", "time": "1:00:00", "venv_path": ".venv/bin/activate"})})
    run = RunDir(tmp_path / "slurm")
    captured = {}
    # instead of sbatch: keep the executors (each job array would unpickle its executor and run its tasks)
    monkeypatch.setattr(data_executors, "run_cluster", lambda executors: captured.setdefault("executors", executors))
    assert prepare_data(cfg, run)["submitted"] == "slurm"
    executors = captured["executors"]
    assert [e.job_name for e in executors] == [f"lathe-data-{s}" for s in
                                               ("prepare", "buckets", "clusters", "finalize", "merge")]
    assert all(e.depends is prev for prev, e in zip(executors, executors[1:]))
    script = executors[0].get_launch_file_contents(executors[0].get_sbatch_args(3), "launch_pickled_pipeline x")
    assert "#SBATCH --partition=cpu" in script and "#SBATCH --array=0-2" in script and "source .venv/bin/activate" in script
    for ex in executors:  # what each Slurm array task would do, in order
        shipped = dill.loads(dill.dumps(ex))
        for rank in range(shipped.world_size):
            data = None
            for step in shipped.pipeline:
                data = step(data, rank, shipped.world_size)
            for _ in data or ():
                pass
    for s in SPLITS:
        assert run.split_file(s).read_bytes() == RunDir(tmp_path / "local").split_file(s).read_bytes()

    ray_cfg = local.model_copy(update={"executor": "ray"})
    stages = build_stages(ray_cfg, str(tmp_path / "w"), str(tmp_path / "r"), 3, {"d": 1.0})
    ray_executors = make_executors(stages, ray_cfg, str(tmp_path / "w"))
    assert [type(e).__name__ for e in ray_executors] == ["RayPipelineExecutor"] * 5
    assert [e.world_size for e in ray_executors] == [3, lsh_params(ray_cfg.dedup)[0], 1, 3, 1]
    dill.loads(dill.dumps(ray_executors[-1]))
    with pytest.raises(LatheError, match="partition"):
        make_executors(stages, local.model_copy(update={"executor": "slurm"}), str(tmp_path / "w"))

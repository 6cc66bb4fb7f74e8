"""The last stage: merge the per-task split files into data/{train,val,test}.jsonl, then write
data/manifest.json (the counts; written last, it marks a complete data stage), data/card.md and
data/card.json (what happened to the data, for people), and data/lengths.png (document lengths).

Token counts in the card are estimates made before any tokenizer exists: UTF-8 bytes / 4, the usual
average for English BPE vocabularies (code and small vocabularies give more tokens per byte).
"""

from __future__ import annotations

import heapq
import json
import time
from pathlib import Path

from lathe.config import DataConfig
from lathe.data.ledger import HIST_BINS, Ledger
from lathe.data.plan import file_of
from lathe.data.splits import SPLITS, donations
from lathe.errors import LatheError
from lathe.io import atomic_path, write_json, write_text

BYTES_PER_TOKEN = 4
TOKEN_ESTIMATE = f"UTF-8 bytes / {BYTES_PER_TOKEN} (an estimate made before tokenizing)"
MAX_LISTED_SKIPS = 20  # skipped files listed per source in the manifest
SKIP_KINDS = ("binary_or_non_utf8", "unreadable")


def est_tokens(nbytes: int) -> int:
    return round(nbytes / BYTES_PER_TOKEN)


# --- gathering ----------------------------------------------------------------------------------
def load_ledger(work, order: list[str]) -> Ledger:
    """The plan's ledger plus every task's, from work/stats."""
    ledgers = []
    for name in sorted(work.list_files("stats")):
        with work.open(name, "r") as f:
            ledgers.append(Ledger.from_json(f.read()))
    return Ledger.merged(ledgers, order)


def _step(src: dict, name: str) -> dict:
    return src["steps"].get(name, {"documents": 0, "bytes": 0})


def build_manifest(cfg: DataConfig, info: dict, ledger: Ledger, splits: dict) -> dict:
    sources = {}
    for meta in info["sources"]:
        src = ledger.sources[meta["label"]]
        skipped = [{"file": p["file"], "reason": p["reason"]} for p in src["problems"] if p["kind"] in SKIP_KINDS]
        sources[meta["label"]] = {
            "spec": meta["spec"], "weight": meta["weight"], "files": meta["files"],
            "files_read": src["counts"].get("files_read", 0), "files_skipped": src["counts"].get("files_skipped", 0),
            "documents": _step(src, "final")["documents"], "bytes": _step(src, "final")["bytes"],
            "skipped_files": skipped[:MAX_LISTED_SKIPS], "removed": src["removed"], "steps": src["steps"],
            "counts": src["counts"],
        }
    return {
        "version": 2,
        "config": cfg.model_dump(mode="json"),
        "sources": sources,
        "totals": totals(sources),
        "budget_reached": info["budget_reached"],
        "budget": {"max_total_bytes": cfg.max_total_bytes, "selected_bytes": sum(s["selected_bytes"] for s in info["sources"]),
                   "shares": {s["label"]: s["share"] for s in info["sources"]}},
        "splits": splits,
        "tasks": info["tasks"],
        "token_estimate": TOKEN_ESTIMATE,
    }


def totals(sources: dict) -> dict:
    counts = ("files", "files_read", "files_skipped", "documents", "bytes")
    out: dict = {k: sum(s[k] for s in sources.values()) for k in counts}
    reasons = sorted({r for s in sources.values() for r in s["removed"]})
    out["removed"] = {r: {k: sum(s["removed"].get(r, {}).get(k, 0) for s in sources.values())
                          for k in ("files", "documents", "bytes")} for r in reasons}
    return out


def no_documents_error(cfg: DataConfig, removed: dict) -> LatheError:
    why = ", ".join(f"{r} {v['documents']} documents/{v['files']} files"
                    for r, v in removed.items() if v["documents"] or v["files"])
    specs = [e if isinstance(e, str) else e.path for e in cfg.sources]
    return LatheError(
        f"no documents left from data sources {specs or '(python stdlib)'} "
        f"(removed: {why or 'nothing'}; min_chars={cfg.min_chars}, max_chars={cfg.max_chars}, "
        f"max_total_bytes={cfg.max_total_bytes})")


# --- merging ------------------------------------------------------------------------------------
def write_splits(work, cfg: DataConfig, data_dir: Path, shards: int, ledger: Ledger) -> dict:
    """Merge each split's per-task files (sorted by hash) into data/<split>.jsonl; an empty wanted split gets
    its document from the largest split (splits.donations), and the ledger's split counts follow it."""
    from lathe.data.steps import merged_rows

    counts = {s: sum(_step(src, f"split_{s}")["documents"] for src in ledger.sources.values()) for s in SPLITS}
    moves = donations(counts, cfg.val_fraction, cfg.test_fraction)
    given: dict[str, list] = {s: [] for s in SPLITS}
    owed = {s: [r for d, r in moves if d == s] for s in SPLITS}
    stats = {}
    for split in sorted(SPLITS, key=lambda s: not owed[s]):  # donors first, so receivers have their rows
        rows = heapq.merge(merged_rows(work, split, shards), iter(given[split]))
        with atomic_path(data_dir / f"{split}.jsonl") as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
            stats[split] = _write_rows(f, rows, split, owed[split], given, ledger)
    return stats


def _write_rows(f, rows, split: str, owed: list[str], given: dict, ledger: Ledger) -> dict:
    n = chars = size = 0
    donated: set[str] = set()
    for h, row in rows:
        n_chars, n_bytes, json_row = row.split("\t", 2)
        if owed or h in donated:  # donated, or another copy of a donated (repeated) document
            source = json.loads(json_row)["source"]
            ledger.passed(f"split_{split}", source, -int(n_bytes), documents=-1)
            if h not in donated:
                receiver = owed.pop(0)
                given[receiver].append((h, row))
                ledger.passed(f"split_{receiver}", source, int(n_bytes))
                donated.add(h)
            continue
        f.write(json_row + "\n")
        n += 1
        chars += int(n_chars)
        size += int(n_bytes)
    return {"documents": n, "chars": chars, "bytes": size}


def finish(work, cfg: DataConfig, run_path: str, shards: int) -> dict:
    data_dir = Path(run_path) / "data"
    with work.open("run.json", "r") as f:
        info = json.load(f)
    with work.open("boilerplate.json", "r") as f:
        info["boilerplate_found"] = json.load(f)
    ledger = load_ledger(work, [s["label"] for s in info["sources"]])
    if not sum(_step(src, "final")["documents"] for src in ledger.sources.values()):
        raise no_documents_error(cfg, totals_removed(ledger))
    (data_dir / "manifest.json").unlink(missing_ok=True)  # the manifest marks a complete data stage: written last
    split_stats = write_splits(work, cfg, data_dir, shards, ledger)
    manifest = build_manifest(cfg, info, ledger, split_stats)
    card = build_card(cfg, info, ledger, manifest)
    plot_lengths(ledger, info, data_dir / "lengths.png")
    write_json(data_dir / "card.json", card)
    write_text(data_dir / "card.md", render_card(card, _resolver(work)))
    write_json(data_dir / "manifest.json", manifest)
    return manifest


def totals_removed(ledger: Ledger) -> dict:
    out: dict = {}
    for src in ledger.sources.values():
        for r, v in src["removed"].items():
            entry = out.setdefault(r, {"files": 0, "documents": 0, "bytes": 0})
            for k in entry:
                entry[k] += v[k]
    return out


# --- the card -----------------------------------------------------------------------------------
STEP_LABELS = {
    "read": "read", "clean": "cleaned", "pii": "PII scrubbed", "length": "length filter",
    "gopher_repetition": "Gopher repetition", "gopher_quality": "Gopher quality", "c4": "C4 quality",
    "fineweb": "FineWeb quality", "language": "language ID", "contaminated": "decontaminated",
    "exact_dedup": "exact dedup", "near_dedup": "near dedup", "boilerplate": "boilerplate",
    "final": "kept (unique)", "mixture": "after mixture weights", "split_train": "train rows",
    "split_val": "val rows", "split_test": "test rows",
}


def build_card(cfg: DataConfig, info: dict, ledger: Ledger, manifest: dict) -> dict:
    steps = [s for s in STEP_LABELS if any(s in src["steps"] for src in ledger.sources.values())]
    train_bytes = sum(_step(src, "split_train")["bytes"] for src in ledger.sources.values()) or 1
    sources = {}
    for meta in info["sources"]:
        src = ledger.sources[meta["label"]]
        sources[meta["label"]] = {
            "spec": meta["spec"], "weight": meta["weight"], "files": meta["files"],
            "steps": {s: dict(_step(src, s), est_tokens=est_tokens(_step(src, s)["bytes"])) for s in steps},
            "removed": {r: v for r, v in src["removed"].items() if v["documents"] or v["files"]},
            "examples": src["examples"], "counts": src["counts"], "problems": src["problems"][:50],
            "problems_total": len(src["problems"]),
            "train_share": _step(src, "split_train")["bytes"] / train_bytes,
            "length_hist": src["hist"],
        }
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "token_estimate": TOKEN_ESTIMATE,
        "steps": steps,
        "sources": sources,
        "splits": manifest["splits"],
        "totals": manifest["totals"],
        "budget": manifest["budget"] | {"reached": manifest["budget_reached"]},
        "cleaning": cfg.clean.model_dump() | {"on_decode_error": cfg.on_decode_error,
                                              "split_long_files": cfg.split_long_files},
        "pii": cfg.pii.model_dump(),
        "filters": info["filters"],
        "dedup": info["dedup"],
        "decontamination": info["decontamination"],
        "boilerplate": info["boilerplate"] | {"lines": _boilerplate_lines(info)},
        "execution": {"executor": cfg.executor, "tasks": info["tasks"]},
        "length_bins": f"bin k holds documents of 2**k to 2**(k+1)-1 characters, k = 0..{HIST_BINS - 1}",
        "images": ["lengths.png"],
    }


def _boilerplate_lines(info: dict) -> dict:
    return info.get("boilerplate_found", {})


def _resolver(work):
    """pos -> 'file#n' for the examples, loading the plan only when asked."""
    cache: dict = {}

    def where(pos: int) -> str:
        if "paths" not in cache:
            from lathe.data.plan import Plan

            with work.open("plan.jsonl", "r") as f:
                cache["paths"] = {p.idx: p.path for p in Plan.files_from_lines(f.read())}
        fi, n = file_of(pos)
        return f"{cache['paths'].get(fi, '?')}#{n}"
    return where


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:,.0f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def render_card(card: dict, where) -> str:
    src_names = list(card["sources"])
    lines = ["# Data card", "", f"Written by `lathe data` on {card['generated']}. Counts are exact; token "
             f"counts are {card['token_estimate']}. Machine-readable: card.json; the full counts: manifest.json.", ""]
    lines += ["## Splits", ""]
    lines += _table(["split", "documents", "characters", "est. tokens"],
                    [[s, f"{v['documents']:,}", f"{v['chars']:,}", _fmt(est_tokens(v["bytes"]))]
                     for s, v in card["splits"].items()])
    lines += ["", "## Sources and mixture", ""]
    lines += _table(["source", "spec", "weight", "files", "documents kept", "est. tokens kept", "train rows",
                     "share of train tokens"],
                    [[n, f"`{s['spec']}`", s["weight"], s["files"], f"{s['steps'].get('final', {}).get('documents', 0):,}",
                      _fmt(s["steps"].get("final", {}).get("est_tokens", 0)),
                      f"{s['steps'].get('split_train', {}).get('documents', 0):,}", f"{s['train_share']:.1%}"]
                     for n, s in card["sources"].items()])
    lines += ["", "## Documents (est. tokens) after each step", ""]
    lines += _table(["step"] + src_names,
                    [[STEP_LABELS[step]] + [f"{s['steps'][step]['documents']:,} ({_fmt(s['steps'][step]['est_tokens'])})"
                                            for s in card["sources"].values()] for step in card["steps"]])
    lines += ["", "## What was removed, and why", ""]
    reasons = sorted({r for s in card["sources"].values() for r in s["removed"]})
    lines += _table(["reason"] + src_names + ["details"],
                    [[r] + [_removed_cell(s["removed"].get(r)) for s in card["sources"].values()]
                     + [_details(card, r)] for r in reasons])
    lines += ["", "Documents are counted where they were removed; a file skipped whole counts as files.", ""]
    lines += _examples(card, where)
    lines += _settings(card)
    lines += _problems(card)
    lines += ["## Document lengths", "", "![document lengths per source, as read and as written](lengths.png)", ""]
    return "\n".join(lines) + "\n"


def _removed_cell(v) -> str:
    if not v:
        return ""
    files = f", {v['files']:,} files" if v["files"] else ""
    return f"{v['documents']:,} docs{files} ({_fmt(v['bytes'])}B)"


def _details(card: dict, reason: str) -> str:
    merged: dict = {}
    for s in card["sources"].values():
        for k, n in s["removed"].get(reason, {}).get("details", {}).items():
            merged[k] = merged.get(k, 0) + n
    return ", ".join(f"{k}: {n:,}" for k, n in sorted(merged.items(), key=lambda kv: -kv[1])[:6])


def _examples(card: dict, where) -> list[str]:
    lines = ["### Examples of removed documents", ""]
    for reason in sorted({r for s in card["sources"].values() for r in s["examples"]}):
        lines += [f"**{reason}**", ""]
        for name, s in card["sources"].items():
            for e in s["examples"].get(reason, [])[:2]:
                loc = json.loads(e["where"]) if e["where"] else {}
                head = f"- `{name}` {where(loc['pos'])}" if "pos" in loc else f"- `{name}`"
                if "kept" in loc:
                    head += f", duplicate of {where(loc['kept'])}"
                if e["detail"]:
                    head += f" ({e['detail']})"
                text = e["text"].replace("`", "'").replace("\n", " ⏎ ")
                lines += [head + f", {e['chars']:,} chars:", f"  > {text}", ""]
    return lines


def _settings(card: dict) -> list[str]:
    d = card["dedup"]
    lines = ["## Settings", "", f"- Cleaning: {card['cleaning']}", f"- PII: {card['pii']}"]
    pii = {k: sum(s["counts"].get(f"pii_{k}", 0) for s in card["sources"].values()) for k in ("email", "phone", "ip")}
    lines.append(f"- PII replaced: {pii['email']:,} e-mail addresses, {pii['phone']:,} phone numbers, {pii['ip']:,} IP addresses")
    repaired = sum(s["counts"].get("files_repaired", 0) for s in card["sources"].values())
    replaced = sum(s["counts"].get("files_replaced", 0) for s in card["sources"].values())
    lines.append(f"- Invalid UTF-8: {repaired:,} files repaired as cp1252, {replaced:,} with bytes replaced")
    for name, f in card["filters"].items():
        lines.append(f"- Filter {name}: {f['status']}" + (f" {f['params']}" if f.get("params") else ""))
    lines.append(f"- Exact dedup: {'on' if d['exact'] else 'off'}; near dedup: " + (
        f"MinHash over {d['ngram']}-word shingles, {d['bands']} bands x {d['rows']} rows (threshold "
        f"{d['threshold']}); P(candidate | Jaccard s): "
        + ", ".join(f"s={s}: {p:.2f}" for s, p in d["curve"].items()) if d["near"] else "off"))
    dc = card["decontamination"]
    lines.append(f"- Decontamination: {dc['ngram']}-word n-grams against "
                 + (", ".join(f"{k} ({n:,} n-grams)" for k, n in dc["sets"].items()) or "no evaluation sets"))
    bp = card["boilerplate"]
    lines.append(f"- Boilerplate: {'on' if bp['enabled'] else 'off'}")
    for name, found in bp["lines"].items():
        if found:
            lines.append(f"  - `{name}`: {len(found)} lines, e.g. " + "; ".join(f"\"{x[:80]}\"" for x in found[:5]))
    b = card["budget"]
    if b["max_total_bytes"]:
        lines.append(f"- Budget: {b['max_total_bytes']:,} input bytes shared by sources "
                     f"({b['selected_bytes']:,} selected; {'reached' if b['reached'] else 'not reached'})")
    lines.append(f"- Execution: {card['execution']}")
    return lines + [""]


def _problems(card: dict) -> list[str]:
    rows = [[name, f"`{p['file']}`", p["kind"], p["reason"].replace("|", "/")]
            for name, s in card["sources"].items() for p in s["problems"]]
    if not rows:
        return []
    total = sum(s["problems_total"] for s in card["sources"].values())
    return ["## Files skipped or cut short", "", f"{total:,} in all" + (" (first 50 per source listed)" if total > len(rows) else ""),
            ""] + _table(["source", "file", "kind", "reason"], rows) + [""]


def plot_lengths(ledger: Ledger, info: dict, path: Path) -> None:
    """One panel per source: documents per power-of-two length bin, as read and as written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["label"] for s in info["sources"]]
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        hist = ledger.sources[name]["hist"]
        used = [k for k in range(HIST_BINS) if hist["input"][k] or hist["output"][k]] or [0]
        first, last = max(used[0] - 1, 0), used[-1] + 2
        edges = range(first, last + 1)
        ax.stairs(hist["input"][first:last], edges, fill=True, alpha=0.45, label="read")
        ax.stairs(hist["output"][first:last], edges, fill=True, alpha=0.7, label="written")
        ticks = range(first, last + 1, max(1, (last - first + 5) // 6))
        ax.set_xticks(list(ticks), [_fmt(2 ** k) for k in ticks])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("characters (log scale)", fontsize=8)
        ax.set_ylabel("documents", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.9, wspace=0.3, hspace=0.6)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)

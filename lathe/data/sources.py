"""Where documents come from: resolve `data.sources` into files, and read each file into raw texts.

A source is a file, a folder (searched recursively, skipping hidden folders and __pycache__) or a glob.
Each becomes a `Source` whose label is the name documents are counted under in the manifest:
a file's name, a folder's name, a glob's pattern (a folder matched by a glob is its own source).
No sources at all means the default corpus: the Python standard library's own .py files.

.txt/.md/.py files are one document each; a .jsonl file is one document per line (the `text_field`).
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lathe.errors import LatheError

DEFAULT_LABEL = "python-stdlib"
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_SNIFF_BYTES = 8192  # how much of a .jsonl file is checked for binary content before streaming it


class SkipFile(Exception):
    """A file that is not UTF-8 text (or cannot be read): skipped with a warning, counted in the manifest."""

    def __init__(self, reason: str, kind: str = "binary_or_non_utf8"):
        super().__init__(reason)
        self.reason, self.kind = reason, kind


@dataclass
class Source:
    label: str  # the name documents are counted under
    spec: str  # what the user wrote (or the stdlib folder)
    files: list[Path] = field(default_factory=list)


# --- finding files ------------------------------------------------------------------------------
def _walk(root: Path, skip_dirs: set[str]) -> list[Path]:
    """All files under root, sorted, without descending into hidden or skipped folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames]
    return sorted(found)


def default_sources() -> list[str]:
    """The .py files of this Python's standard library (no site-packages, no test suites), sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(p) for p in _walk(stdlib, _STDLIB_SKIP_DIRS) if p.suffix == ".py"]


def normalize_extensions(extensions: list[str]) -> set[str]:
    return {(e if e.startswith(".") else "." + e).lower() for e in extensions}


def _keep(path: Path, exts: set[str]) -> bool:
    return path.suffix.lower() in exts and path.is_file()


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _resolve_one(spec: str, exts: set[str]) -> list[Source]:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [p for p in _walk(path, {"__pycache__"}) if _keep(p, exts)]
        return [Source(path.resolve().name or str(path), spec, files)]
    if path.is_file():
        if path.suffix.lower() not in exts:
            raise LatheError(f"data source {spec}: extension '{path.suffix}' is not in data.extensions {sorted(exts)}")
        return [Source(path.name, spec, [path])]
    if _is_glob(spec):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        if not matches:
            raise LatheError(f"data source {spec}: the pattern matched nothing")
        folders = [s for m in matches if m.is_dir() for s in _resolve_one(str(m), exts)]
        files = [m for m in matches if _keep(m, exts)]
        return folders + ([Source(spec, spec, files)] if files else [])
    raise LatheError(f"data source {spec} does not exist (a file, a folder or a glob pattern)")


def _unique_labels(sources: list[Source]) -> list[Source]:
    """Two folders with the same name (a/data, b/data) stay apart in the manifest: the later uses its spec."""
    seen: set[str] = set()
    for s in sources:
        if s.label in seen:
            s.label = s.spec
        while s.label in seen:
            s.label += "'"
        seen.add(s.label)
    return sources


def resolve_sources(specs: list[str], extensions: list[str]) -> list[Source]:
    """data.sources -> Sources with their files (only files whose extension is listed). Empty -> stdlib."""
    exts = normalize_extensions(extensions)
    if not specs:
        stdlib = sysconfig.get_paths()["stdlib"]
        sources = [Source(DEFAULT_LABEL, stdlib, [Path(p) for p in default_sources() if Path(p).suffix in exts])]
    else:
        sources = _unique_labels([s for spec in specs for s in _resolve_one(spec, exts)])
    if not any(s.files for s in sources):
        names = ", ".join(specs) if specs else f"the Python standard library ({sources[0].spec})"
        raise LatheError(f"data sources {names} had no readable files with extensions {sorted(exts)}")
    return sources


# --- reading files ------------------------------------------------------------------------------
def _decode(data: bytes, path: Path) -> str:
    if b"\x00" in data:
        raise SkipFile(f"{path}: binary file (contains NUL bytes)")
    try:
        return data.decode("utf-8-sig")  # -sig: a leading byte-order mark is not text
    except UnicodeDecodeError as e:
        raise SkipFile(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def _sniff(path: Path) -> None:
    """Skip a binary or non-UTF-8 .jsonl up front, from its first bytes, so it can be streamed after."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if b"\x00" in head:
        raise SkipFile(f"{path}: binary file (contains NUL bytes)")
    try:  # final=False: a character cut in half at the end of the sniffed block is fine
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        raise SkipFile(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def _jsonl_text(line: str, where: str, text_field: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise LatheError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise LatheError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if text_field not in row:
        raise LatheError(f"{where}: no '{text_field}' field (data.text_field names the field holding the text)")
    text = row[text_field]
    if not isinstance(text, str):
        raise LatheError(f"{where}: field '{text_field}' is {type(text).__name__}, expected a string")
    return text


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """Stream a .jsonl file: one document per non-blank line. A bad line is an error naming file:line."""
    _sniff(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise LatheError(f"{where}: not valid UTF-8") from None
            if line.strip():
                yield _jsonl_text(line, where, text_field)


def read_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """The raw texts in one file. Raises SkipFile for binary / non-UTF-8 / unreadable files."""
    try:
        if path.suffix.lower() == ".jsonl":
            yield from _read_jsonl(path, text_field)
        else:
            yield _decode(path.read_bytes(), path)
    except OSError as e:
        raise SkipFile(f"{path}: cannot be read ({e.strerror or e})", kind="unreadable") from None

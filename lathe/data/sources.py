"""Where documents come from: resolve `data.sources` into sources, each a labelled list of files.

A source is a file, a folder (searched recursively, skipping hidden folders and __pycache__), a glob, or an
fsspec URL (hf://datasets/org/name/..., s3://bucket/prefix, file:///abs/path; remote ones need the network).
Each becomes a `Source` whose label is the name documents are counted under in the manifest and the card:
a file's name, a folder's name, a glob's pattern (each folder a glob matches is its own source), or the
`name` given. No sources at all means the default corpus: the Python standard library's own .py files.

Only files whose name ends with one of `data.extensions` are read (".jsonl.gz" counts as one extension).
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from lathe.config import DataConfig, DataSource
from lathe.errors import LatheError

DEFAULT_LABEL = "python-stdlib"
# test suites, and the codec tables of encodings/ (generated character maps, not Python as people write it)
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}


@dataclass
class FileRef:
    path: str  # a local path or a URL
    size: int  # bytes on disk (0 when unknown)


@dataclass
class Source:
    label: str  # the name documents are counted under
    spec: str  # what the user wrote (or the stdlib folder)
    files: list[FileRef] = field(default_factory=list)
    weight: float = 1.0  # mixture weight (see lathe.data.mixture)
    text_field: str = "text"

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


# --- finding files ------------------------------------------------------------------------------
def _walk(root: Path, skip_dirs: set[str]) -> list[Path]:
    """All files under root, sorted, without descending into hidden or skipped folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames]
    return sorted(found)


def default_sources() -> list[str]:
    """The .py files of this Python's standard library (no site-packages, no test suites).

    Ordered by a hash of the relative path, not alphabetically: a byte budget then takes a spread
    of the whole library instead of only the `_private` modules at the top of the alphabet."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in _walk(stdlib, _STDLIB_SKIP_DIRS) if p.suffix == ".py"]
    return [str(p) for p in sorted(files, key=lambda p: hashlib.sha256(str(p.relative_to(stdlib)).encode()).digest())]


def normalize_extensions(extensions: list[str]) -> tuple[str, ...]:
    return tuple(sorted({(e if e.startswith(".") else "." + e).lower() for e in extensions}))


def has_extension(name: str, exts: tuple[str, ...]) -> bool:
    return name.lower().endswith(exts)


def _local_ref(path: Path) -> FileRef:
    return FileRef(str(path), path.stat().st_size)


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _is_url(spec: str) -> bool:
    return "://" in spec


def _resolve_local(spec: str, exts: tuple[str, ...]) -> list[Source]:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [_local_ref(p) for p in _walk(path, {"__pycache__"}) if has_extension(p.name, exts)]
        return [Source(path.resolve().name or str(path), spec, files)]
    if path.is_file():
        if not has_extension(path.name, exts):
            raise LatheError(f"data source {spec}: '{path.name}' does not end with one of data.extensions {list(exts)}")
        return [Source(path.name, spec, [_local_ref(path)])]
    if _is_glob(spec):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        if not matches:
            raise LatheError(f"data source {spec}: the pattern matched nothing")
        folders = [s for m in matches if m.is_dir() for s in _resolve_local(str(m), exts)]
        files = [_local_ref(m) for m in matches if m.is_file() and has_extension(m.name, exts)]
        return folders + ([Source(spec, spec, files)] if files else [])
    raise LatheError(f"data source {spec} does not exist (a file, a folder, a glob pattern or a URL)")


def _resolve_url(spec: str, exts: tuple[str, ...]) -> list[Source]:
    """A remote folder, file or glob through fsspec. Listing needs the network for remote protocols."""
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(spec)
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        if _is_glob(path):
            infos = fs.glob(path, detail=True)
        elif fs.isdir(path):
            infos = fs.find(path, detail=True)
        else:
            infos = {path: fs.info(path)}
    except (OSError, ValueError, ImportError) as e:
        raise LatheError(f"data source {spec}: cannot be listed ({type(e).__name__}: {e})") from None
    files = [FileRef(fs.unstrip_protocol(p) if protocol != "file" else p, int(info.get("size") or 0))
             for p, info in sorted(infos.items())
             if info.get("type") != "directory" and has_extension(p.rsplit("/", 1)[-1], exts)]
    label = spec.rstrip("/").rsplit("/", 1)[-1] or spec
    return [Source(spec if _is_glob(path) else label, spec, files)]


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


def _resolve_entry(entry: str | DataSource, cfg: DataConfig, exts: tuple[str, ...]) -> list[Source]:
    spec = entry if isinstance(entry, str) else entry.path
    found = _resolve_url(spec, exts) if _is_url(spec) else _resolve_local(spec, exts)
    if isinstance(entry, DataSource):
        for s in found:
            s.weight = entry.weight
            s.text_field = entry.text_field or cfg.text_field
        if entry.name:  # one name for everything the entry matched
            found = [Source(entry.name, spec, [f for s in found for f in s.files], entry.weight,
                            entry.text_field or cfg.text_field)]
    else:
        for s in found:
            s.text_field = cfg.text_field
    return found


def resolve_sources(cfg: DataConfig) -> list[Source]:
    """data.sources -> Sources with their files (only files with a listed extension). Empty -> stdlib."""
    exts = normalize_extensions(cfg.extensions)
    if not cfg.sources:
        stdlib = sysconfig.get_paths()["stdlib"]
        files = [_local_ref(Path(p)) for p in default_sources() if has_extension(p, exts)]
        sources = [Source(DEFAULT_LABEL, stdlib, files, text_field=cfg.text_field)]
    else:
        sources = _unique_labels([s for entry in cfg.sources for s in _resolve_entry(entry, cfg, exts)])
    if not any(s.files for s in sources):
        names = ", ".join(source_specs(cfg)) if cfg.sources else f"the Python standard library ({sources[0].spec})"
        raise LatheError(f"data sources {names} had no readable files with extensions {list(exts)}")
    return sources


def source_specs(cfg: DataConfig) -> list[str]:
    return [e if isinstance(e, str) else e.path for e in cfg.sources]

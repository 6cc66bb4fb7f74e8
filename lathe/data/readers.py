"""Read one input file into raw documents, with bounded memory and every loss counted.

Formats, by file name:
  .jsonl, .jsonl.gz   one document per non-blank line, the text in `text_field`
  .parquet            one document per row, the text in column `text_field`
  .html, .htm         the page's main text (trafilatura); a page with none is counted as `html_no_text`
  anything else       plain text: one document per file; with `split_long_files`, a file over max_chars
                      is cut at blank lines into documents of up to max_chars (see split_paragraphs)

Bad input never disappears silently:
  invalid UTF-8       on_decode_error: skip the file (SkipFile), or replace / repair the bad bytes
                      (repair decodes them as cp1252, the usual culprit; both are counted per file)
  binary (NUL bytes)  SkipFile
  truncated .gz, a parquet file that breaks mid-way
                      the documents before the break are kept; the file is listed with the reason
  not gzip / not parquet / unreadable
                      SkipFile with the reason
  a line over the line limit (a 50 MB single line)
                      never held in memory: drained and counted as a too_long document
  malformed .jsonl line or parquet value
                      on_bad_record: LatheError naming file:line, or skipped and counted
"""

from __future__ import annotations

import codecs
import gzip
import io
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, Iterator, Optional

from lathe.config import DataConfig
from lathe.errors import LatheError

try:  # datatrove's own JSON reader uses orjson; it is 3-5x faster than json on long lines
    from orjson import loads as json_loads
except ImportError:  # pragma: no cover
    from json import loads as json_loads
from json import JSONDecodeError

_SNIFF_BYTES = 8192  # how much of a streamed file is checked for binary content
_CHUNK = 1 << 20
MAX_LISTED = 5  # bad records listed per file


class SkipFile(Exception):
    """A file that is not text (or cannot be read): skipped, named and counted in the manifest."""

    def __init__(self, reason: str, kind: str = "binary_or_non_utf8"):
        super().__init__(reason)
        self.reason, self.kind = reason, kind


@dataclass
class RawDoc:
    text: Optional[str]  # None: removed at read time (too long to hold, or an HTML page without main text)
    nbytes: int  # UTF-8 bytes of the raw text (for a removed one: the bytes it took in the file)
    removed: str = ""  # the reason when text is None


@dataclass
class FileNotes:
    """What happened to one file besides its documents; turned into ledger counts by the read step."""
    repaired_bytes: int = 0  # invalid UTF-8 bytes decoded as cp1252
    replaced_bytes: int = 0  # invalid UTF-8 bytes replaced with U+FFFD
    overlong: list[int] = field(default_factory=list)  # sizes of lines over the line limit (dropped)
    bad_records: int = 0
    bad_reasons: list[str] = field(default_factory=list)
    broken: str = ""  # why reading stopped early (truncated gzip, corrupt parquet)
    stopped_at_budget: bool = False
    bytes_read: int = 0
    pieces: int = 0  # documents a long plain-text file was split into

    def bad(self, reason: str) -> None:
        self.bad_records += 1
        if len(self.bad_reasons) < MAX_LISTED:
            self.bad_reasons.append(reason)


# --- decoding -----------------------------------------------------------------------------------
# cp1252 with its 5 undefined bytes mapped to the same code points as latin-1 ("sloppy" cp1252, as ftfy does)
_CP1252 = [bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in range(256)]
_decode_counts = {"repair": 0, "replace": 0}


def _repair(err: UnicodeDecodeError):
    bad = err.object[err.start:err.end]
    _decode_counts["repair"] += len(bad)
    return "".join(_CP1252[b] for b in bad), err.end


def _replace(err: UnicodeDecodeError):
    _decode_counts["replace"] += err.end - err.start
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("lathe-repair", _repair)
codecs.register_error("lathe-replace", _replace)
_ERRORS = {"skip": "strict", "replace": "lathe-replace", "repair": "lathe-repair"}


class _DecodeCounter:
    """Collects the bytes the error handlers repaired/replaced while a file was read."""

    def __init__(self, notes: FileNotes):
        self.notes = notes

    def __enter__(self):
        self.start = dict(_decode_counts)

    def __exit__(self, *exc):
        self.notes.repaired_bytes += _decode_counts["repair"] - self.start["repair"]
        self.notes.replaced_bytes += _decode_counts["replace"] - self.start["replace"]


def decode(data: bytes, policy: str, where: str) -> str:
    try:
        return data.decode("utf-8", errors=_ERRORS[policy])
    except UnicodeDecodeError as e:
        raise SkipFile(f"{where}: not UTF-8 text (bad byte at offset {e.start})") from None


def _check_not_binary(head: bytes, where: str) -> None:
    if b"\x00" in head:
        raise SkipFile(f"{where}: binary file (contains NUL bytes)")


def _check_utf8(stream: BinaryIO, where: str) -> None:
    """A streaming validation pass (GB/s), so on_decode_error=skip never keeps half a file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    while chunk := stream.read(_CHUNK):
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as e:
            raise SkipFile(f"{where}: not UTF-8 text (bad byte at offset {offset + e.start})") from None
        offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise SkipFile(f"{where}: not UTF-8 text (bad byte at offset {offset + e.start})") from None


# --- opening ------------------------------------------------------------------------------------
def open_binary(path: str) -> BinaryIO:
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def _lines(stream: BinaryIO, limit: int, notes: FileNotes) -> Iterator[bytes]:
    """Lines of at most `limit` bytes. A longer one is read through in chunks, counted, and not yielded."""
    while line := stream.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            size = len(line)
            while (more := stream.readline(_CHUNK)) and not more.endswith(b"\n"):
                size += len(more)
            notes.overlong.append(size + len(more))
            continue
        yield line


# --- plain text ---------------------------------------------------------------------------------
def _paragraphs(lines: Iterable[str]) -> Iterator[list[str]]:
    """Group lines into paragraphs; a blank line ends (and belongs to) the paragraph before it."""
    para: list[str] = []
    for line in lines:
        para.append(line)
        if not line.strip():
            yield para
            para = []
    if para:
        yield para


def split_paragraphs(lines: Iterable[str], max_chars: int) -> Iterator[str]:
    """Pieces of at most max_chars characters from lines of at most max_chars each: whole paragraphs
    packed together while they fit; a paragraph longer than max_chars is cut at line ends.
    Joining the pieces gives back the input exactly."""
    piece: list[str] = []
    size = 0
    for para in _paragraphs(lines):
        n = sum(map(len, para))
        if size + n <= max_chars:
            piece += para
            size += n
            continue
        for line in para:
            if size + len(line) > max_chars and piece:
                yield "".join(piece)
                piece, size = [], 0
            piece.append(line)
            size += len(line)
    if piece:
        yield "".join(piece)


def _read_text(stream: BinaryIO, path: str, size: int, cfg: DataConfig, notes: FileNotes,
               limit: Optional[int]) -> Iterator[RawDoc]:
    # chars <= bytes, and a char is at most 4 bytes: a file of at most max_chars bytes is one document
    if size <= cfg.max_chars or not cfg.split_long_files:
        if not cfg.split_long_files and size > 4 * cfg.max_chars:
            yield RawDoc(None, size, "too_long")  # cannot fit: not read at all
            return
        data = stream.read()
        _check_not_binary(data, path)
        text = decode(data.removeprefix(codecs.BOM_UTF8), cfg.on_decode_error, path)
        if len(text) <= cfg.max_chars or not cfg.split_long_files:
            yield RawDoc(text, len(data))
            return
        text_stream: io.TextIOBase = io.StringIO(text, newline="")
    else:
        head = stream.read(_SNIFF_BYTES)
        _check_not_binary(head, path)
        if cfg.on_decode_error == "skip":
            _check_utf8(_Rewound(head, stream), path)
            stream.seek(0)
            head = stream.read(_SNIFF_BYTES)
        text_stream = io.TextIOWrapper(_Rewound(head, stream), encoding="utf-8-sig",
                                       errors=_ERRORS[cfg.on_decode_error], newline="")
    piece_chars = min(cfg.max_chars, limit) if limit else cfg.max_chars  # under a budget cut, pieces that fit it
    for piece in split_paragraphs(_capped_text_lines(text_stream, piece_chars, notes), piece_chars):
        notes.pieces += 1
        yield RawDoc(piece, len(piece.encode("utf-8")))


def _capped_text_lines(stream: io.TextIOBase, limit: int, notes: FileNotes) -> Iterator[str]:
    while line := stream.readline(limit + 1):
        if len(line) > limit and not line.endswith("\n"):
            size = len(line.encode("utf-8"))
            while (more := stream.readline(_CHUNK)) and not more.endswith("\n"):
                size += len(more.encode("utf-8"))
            notes.overlong.append(size + len(more.encode("utf-8")))
            continue
        yield line


class _Rewound(io.RawIOBase):
    """A stream whose first bytes were already read: serves them again, then the rest."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


# --- jsonl --------------------------------------------------------------------------------------
def _json_text(line: str, where: str, text_field: str) -> str:
    try:
        row = json_loads(line)
    except JSONDecodeError as e:
        raise _BadRecord(f"{where}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(row, dict):
        raise _BadRecord(f"{where}: expected a JSON object, got {type(row).__name__}")
    if text_field not in row:
        raise _BadRecord(f"{where}: no '{text_field}' field (data.text_field names the field holding the text)")
    text = row[text_field]
    if not isinstance(text, str):
        raise _BadRecord(f"{where}: field '{text_field}' is {type(text).__name__}, expected a string")
    return text


class _BadRecord(Exception):
    pass


def _bad_record(err: _BadRecord, cfg: DataConfig, notes: FileNotes) -> None:
    if cfg.on_bad_record == "error":
        raise LatheError(str(err))
    notes.bad(str(err))


def _read_jsonl(stream: BinaryIO, path: str, text_field: str, cfg: DataConfig,
                notes: FileNotes) -> Iterator[RawDoc]:
    if path.lower().endswith(".gz"):
        stream = gzip.GzipFile(fileobj=stream)
    line_limit = 8 * cfg.max_chars + 4096  # JSON escapes can take 6 bytes per character
    lineno = 0
    try:
        first = True
        for lineno, raw in enumerate(_lines(stream, line_limit, notes), 1):
            if first:
                _check_not_binary(raw[:_SNIFF_BYTES], path)
                raw, first = raw.removeprefix(codecs.BOM_UTF8), False
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8", errors=_ERRORS[cfg.on_decode_error])
            except UnicodeDecodeError:
                if lineno == 1:
                    raise SkipFile(f"{path}: not UTF-8 text (line 1)") from None
                raise LatheError(f"{where}: not valid UTF-8 (data.on_decode_error=replace or repair reads it)") from None
            if not line.strip():
                continue
            try:
                yield RawDoc(text := _json_text(line, where, text_field), len(text.encode("utf-8")))
            except _BadRecord as e:
                _bad_record(e, cfg, notes)
    except gzip.BadGzipFile as e:
        if lineno == 0:
            raise SkipFile(f"{path}: not a gzip file ({e})", kind="unreadable") from None
        notes.broken = f"corrupt gzip data after line {lineno} ({e}); the lines before it were kept"
    except (EOFError, zlib.error) as e:
        notes.broken = f"truncated or corrupt gzip stream after line {lineno} ({e}); the lines before it were kept"


# --- parquet ------------------------------------------------------------------------------------
def _read_parquet(stream: BinaryIO, path: str, text_field: str, cfg: DataConfig,
                  notes: FileNotes) -> Iterator[RawDoc]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(stream)
    except (pa.ArrowException, OSError) as e:
        raise SkipFile(f"{path}: not a valid parquet file ({e})", kind="unreadable") from None
    if text_field not in pf.schema_arrow.names:
        raise LatheError(f"{path}: no '{text_field}' column (columns: {', '.join(pf.schema_arrow.names)}; "
                         "data.text_field names the column holding the text)")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=256, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                if isinstance(value, str):
                    yield RawDoc(value, len(value.encode("utf-8")))
                else:
                    _bad_record(_BadRecord(f"{path}: row {row}: column '{text_field}' is "
                                           f"{type(value).__name__}, expected a string"), cfg, notes)
    except (pa.ArrowException, OSError) as e:
        notes.broken = f"unreadable after row {row} ({e}); the rows before it were kept"


# --- html ---------------------------------------------------------------------------------------
def _read_html(stream: BinaryIO, path: str, size: int, cfg: DataConfig, notes: FileNotes) -> Iterator[RawDoc]:
    import trafilatura

    if size > 50 * cfg.max_chars:  # pages are mostly markup, but not this much
        yield RawDoc(None, size, "too_long")
        return
    data = stream.read()
    _check_not_binary(data[:_SNIFF_BYTES], path)
    text = trafilatura.extract(decode(data, cfg.on_decode_error, path), include_comments=False)
    yield RawDoc(text, len(data)) if text else RawDoc(None, len(data), "html_no_text")


# --- dispatch -----------------------------------------------------------------------------------
def read_file(path: str, size: int, text_field: str, cfg: DataConfig, notes: FileNotes,
              limit: Optional[int] = None) -> Iterator[RawDoc]:
    """The raw documents of one file, stopping before the one that would take it past `limit` input bytes.
    Raises SkipFile for files that are not text or cannot be read."""
    name = path.lower()
    try:
        with open_binary(path) as stream, _DecodeCounter(notes):
            if name.endswith((".jsonl", ".jsonl.gz")):
                docs = _read_jsonl(stream, path, text_field, cfg, notes)
            elif name.endswith(".parquet"):
                docs = _read_parquet(stream, path, text_field, cfg, notes)
            elif name.endswith((".html", ".htm")):
                docs = _read_html(stream, path, size, cfg, notes)
            else:
                docs = _read_text(stream, path, size, cfg, notes, limit)
            for doc in docs:
                if limit is not None and notes.bytes_read + doc.nbytes > limit:
                    notes.stopped_at_budget = True
                    return
                notes.bytes_read += doc.nbytes
                yield doc
    except OSError as e:
        raise SkipFile(f"{path}: cannot be read ({e.strerror or e})", kind="unreadable") from None


def is_multi_document(path: str, size: int, cfg: DataConfig) -> bool:
    """Files a byte budget can cut part-way (the rest are taken whole or not at all)."""
    name = path.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".parquet")):
        return True
    return not name.endswith((".html", ".htm")) and cfg.split_long_files and size > cfg.max_chars


ReadFn = Callable[..., Iterator[RawDoc]]

"""The tokenizer stage: train a byte-level BPE tokenizer on the train split, then encode every split
into a flat token shard.

    tok = train_tokenizer_stage(run, recipe.tokenizer)   # -> runs/x/tokenizer.json
    meta = encode_shards(run, tok)                      # -> runs/x/tokens/{train,val,test}.bin, meta.json
    tokens = load_tokens(run, "train")                  # read-only np.memmap

Byte-level BPE: text is split into pieces (digits one by one, then the GPT-2 regex), each piece is
turned into its UTF-8 bytes, and merges are learned over bytes. All 256 bytes are in the vocabulary,
so any string encodes with no unknown token and decodes back to exactly the same string.

The special tokens come first (ids 0..12). Special-token *strings* in ordinary text (a document that
happens to contain "<|bos|>") are encoded as plain text by default, so data can never forge a
document boundary or a chat-role marker; only code that builds a prompt on purpose passes
`allow_special=True`.

A shard is the concatenation of `[bos] + encode(doc)` for every document of a split, stored as raw
uint16 (uint32 for vocabularies over 65536). tokens/meta.json records dtype and counts; it is
written last, so its presence marks a complete stage.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lathe.config import TokenizerConfig
from lathe.console import progress_bar, warn
from lathe.errors import LatheError
from lathe.io import atomic_path, read_json, write_json
from lathe.rundir import RunDir

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document: the document separator in the token shards
    "<|eos|>",
    "<|pad|>",
    "<|system_start|>",
    "<|system_end|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
    "<|tool_result_start|>",
    "<|tool_result_end|>",
]
SPLITS = ("train", "val", "test")
META_FILE = "meta.json"
_BATCH_BYTES = 4 << 20  # text per encode_batch call: enough work for the Rust threads, bounded memory
_BATCH_DOCS = 4096


# --- the tokenizer ----------------------------------------------------------------------------
class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with lathe's special tokens at ids 0..12."""

    def __init__(self, inner: HFTokenizer, source: str = "tokenizer"):
        _check_special_tokens(inner, source)
        self._inner = inner  # recognises special-token strings: used only with allow_special=True
        # A second instance that treats special-token strings as plain text; the flag is state on the
        # tokenizer object, so two instances avoid toggling it (and racing) on every call.
        self._text_only = HFTokenizer.from_str(inner.to_str())
        self._text_only.encode_special_tokens = True

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise LatheError(f"tokenizer file {path} does not exist")
        try:
            inner = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise LatheError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls(inner, source=str(path))

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            self._inner.save(str(tmp))

    @property
    def hf(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (for export); treat it as read-only."""
        return self._inner

    # --- encoding / decoding --------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; no special tokens are added. With allow_special=False (the default),
        special-token strings inside `text` are encoded as the plain characters they are."""
        return self._pick(allow_special).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """`encode` for many texts at once, in parallel threads."""
        tok = self._pick(allow_special)
        if hasattr(tok, "encode_batch_fast"):  # tokenizers >= 0.21: skips computing offsets
            return [e.ids for e in tok.encode_batch_fast(list(texts), add_special_tokens=False)]
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`. Special tokens appear as their strings unless skipped. Ids outside the
        vocabulary are dropped (a model with a padded vocabulary may sample one). An incomplete UTF-8
        sequence (a cut multi-byte character) decodes to U+FFFD."""
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        return self._inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def _pick(self, allow_special: bool) -> HFTokenizer:
        return self._inner if allow_special else self._text_only

    # --- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._inner.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.special_id("<|bos|>")

    @property
    def eos_id(self) -> int:
        return self.special_id("<|eos|>")

    @property
    def pad_id(self) -> int:
        return self.special_id("<|pad|>")

    def special_id(self, name: str) -> int:
        """Id of a special token, by its string ('<|user_start|>') or its bare name ('user_start')."""
        token = name if name.startswith("<|") else f"<|{name}|>"
        if token not in SPECIAL_TOKENS:
            raise LatheError(f"unknown special token '{name}' (one of: {', '.join(SPECIAL_TOKENS)})")
        return SPECIAL_TOKENS.index(token)  # _check_special_tokens guarantees id == position

    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte length each id stands for (0 for special tokens), int64 of length vocab_size.
        Summed over a token sequence it gives the bytes of its text: the denominator of bits-per-byte."""
        return self._token_bytes.copy()

    @cached_property
    def _token_bytes(self) -> np.ndarray:
        byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(len(SPECIAL_TOKENS), self.vocab_size):
            token = self._inner.id_to_token(i)
            if token is None or any(ch not in byte_of for ch in token):
                raise LatheError(f"token id {i} ({token!r}) is not a byte-level token: not a lathe tokenizer")
            out[i] = len(token)  # one byte-level character per byte
        return out


def _check_special_tokens(inner: HFTokenizer, source: str) -> None:
    """lathe relies on the special tokens sitting at ids 0..12 (bos_id, the chat format)."""
    for i, token in enumerate(SPECIAL_TOKENS):
        if inner.token_to_id(token) != i:
            raise LatheError(f"{source}: special token {token} is not at id {i}: not a lathe tokenizer "
                             f"(rerun `lathe tokenizer`)")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the one the ByteLevel pre-tokenizer uses: printable
    Latin-1 bytes map to themselves, the other bytes to code points from 256 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# --- training ---------------------------------------------------------------------------------
def new_bpe(split_digits: bool = True) -> HFTokenizer:
    """An untrained byte-level BPE tokenizer: no normalizer (lossless), no prefix space, no unk token."""
    tok = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # one token per digit: numbers get a consistent, learnable representation
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    return tok


class _ByteBudget:
    """Iterate texts up to `limit` UTF-8 bytes in total (the last text cut to fit); counts bytes seen."""

    def __init__(self, texts: Iterable[str], limit: int | None):
        self.texts, self.limit, self.bytes = texts, limit, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            data = text.encode("utf-8")
            if self.limit is not None and self.bytes + len(data) > self.limit:
                rest = data[: self.limit - self.bytes].decode("utf-8", errors="ignore")  # whole characters only
                if rest:
                    self.bytes += len(rest.encode("utf-8"))
                    yield rest
                return
            self.bytes += len(data)
            yield text


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train byte-level BPE on `texts` (at most cfg.max_train_bytes of them); vocab_size counts the
    special tokens and the 256 byte tokens. A corpus too small for that many merges gives fewer tokens."""
    inner = new_bpe(cfg.split_digits)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,  # first, so they get ids 0..12
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    budget = _ByteBudget(texts, cfg.max_train_bytes)
    inner.train_from_iterator(iter(budget), trainer)
    if budget.bytes == 0:
        raise LatheError("no text to train the tokenizer on")
    tok = Tokenizer(inner)
    if tok.vocab_size < cfg.vocab_size:
        warn(f"tokenizer: the training text ({budget.bytes:,} bytes) only supports {tok.vocab_size} tokens "
             f"(vocab_size={cfg.vocab_size}, min_frequency={cfg.min_frequency})")
    return tok


def train_tokenizer_stage(run: RunDir, cfg: TokenizerConfig) -> Tokenizer:
    """Train on run.data/train.jsonl and save run.tokenizer."""
    path = run.require(run.split_file("train"), "data")
    (run.tokens / META_FILE).unlink(missing_ok=True)  # shards made by an older tokenizer are stale now
    with progress_bar() as bar:
        task = bar.add_task("tokenizer", total=path.stat().st_size, status="reading")

        def texts() -> Iterator[str]:
            for text, raw_bytes in _read_docs(path):
                bar.advance(task, raw_bytes)
                yield text
            bar.update(task, status="learning merges")  # the Rust side merges once the input is read

        tok = train_tokenizer(texts(), cfg)
        bar.update(task, completed=path.stat().st_size, status=f"{tok.vocab_size} tokens")
    tok.save(run.tokenizer)
    return tok


def _read_docs(path: Path) -> Iterator[tuple[str, int]]:
    """(text, raw line bytes) of each row of a data split; the raw size drives the progress bars."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LatheError(f"{path}:{lineno}: not valid JSON ({e}); rerun `lathe data`") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise LatheError(f"{path}:{lineno}: the row has no 'text' string; rerun `lathe data`")
            yield text, len(line)


# --- token shards -----------------------------------------------------------------------------
def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_shards(run: RunDir, tok: Tokenizer) -> dict:
    """Encode every split into tokens/{split}.bin and write tokens/meta.json; return the meta."""
    meta_path = run.tokens / META_FILE
    meta_path.unlink(missing_ok=True)  # meta.json marks complete shards: removed first, written last
    sources = {split: run.require(run.split_file(split), "data") for split in SPLITS}
    dtype = shard_dtype(tok.vocab_size)
    meta = {"dtype": dtype.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "splits": {}}
    with progress_bar() as bar:
        for split, src in sources.items():
            task = bar.add_task(f"encode {split}", total=src.stat().st_size, status="")
            meta["splits"][split] = _encode_split(src, run.token_file(split), tok, dtype,
                                                  lambda n, s: bar.update(task, advance=n, status=s))
    write_json(meta_path, meta)
    return meta


def _encode_split(src: Path, dst: Path, tok: Tokenizer, dtype: np.dtype, report) -> dict:
    """Stream one split through encode_batch into a raw shard; `report(raw_bytes, status)` per batch."""
    stats = {"tokens": 0, "documents": 0, "bytes": 0}
    with atomic_path(dst) as tmp, open(tmp, "wb") as out:
        for texts, raw_bytes in _batches(_read_docs(src)):
            ids = _join_with_bos(tok.encode_batch(texts), tok.bos_id, dtype)
            ids.tofile(out)
            stats["tokens"] += int(ids.size)
            stats["documents"] += len(texts)
            stats["bytes"] += sum(len(t.encode("utf-8")) for t in texts)
            report(raw_bytes, f"{stats['tokens']:,} tokens")
    return stats


def _batches(docs: Iterator[tuple[str, int]]) -> Iterator[tuple[list[str], int]]:
    batch, raw = [], 0
    for text, raw_bytes in docs:
        batch.append(text)
        raw += raw_bytes
        if raw >= _BATCH_BYTES or len(batch) >= _BATCH_DOCS:
            yield batch, raw
            batch, raw = [], 0
    if batch:
        yield batch, raw


def _join_with_bos(encoded: list[list[int]], bos: int, dtype: np.dtype) -> np.ndarray:
    flat: list[int] = []
    for ids in encoded:
        flat.append(bos)
        flat.extend(ids)
    return np.array(flat, dtype=dtype)


def load_meta(run: RunDir) -> dict:
    """tokens/meta.json: {dtype, vocab_size, bos_id, splits: {split: {tokens, documents, bytes}}}."""
    return read_json(run.require(run.tokens / META_FILE, "tokenizer"))


def load_tokens(run: RunDir, split: str) -> np.ndarray:
    """The token shard of `split` as a read-only np.memmap (an empty array for an empty split)."""
    meta = load_meta(run)
    if split not in meta["splits"]:
        raise LatheError(f"no split '{split}' in {run.tokens / META_FILE} (have: {', '.join(meta['splits'])})")
    path = run.require(run.token_file(split), "tokenizer")
    dtype, count = np.dtype(meta["dtype"]), meta["splits"][split]["tokens"]
    size = os.path.getsize(path)
    if size != count * dtype.itemsize:
        raise LatheError(f"{path} has {size:,} bytes but {META_FILE} says {count:,} {dtype.name} tokens: "
                         f"rerun `lathe tokenizer --run {run.path}`")
    if count == 0:
        empty = np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r")

"""Text cleaning: pure functions, str -> str. Conservative on purpose: code keeps its indentation and tabs.

clean_text applies, in order:
  1. line endings \\r\\n and \\r -> \\n
  2. drop control characters (Unicode category Cc) except \\n and \\t, and a leading byte-order mark
  3. Unicode normalization, NFC by default (the same text always has the same bytes, so dedup sees it as equal)
  4. strip trailing whitespace on every line
  5. collapse runs of 3+ blank lines to 2
  6. strip leading and trailing blank lines (leading indentation of the first line is kept)
  7. optionally lower-case

`fix_unicode` runs before it when data.clean.fix_unicode is on: ftfy repairs mojibake ("cafÃ©" -> "café"),
C1 controls and terminal escapes. It leaves HTML entities, quotes and ligatures alone (code uses them).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Callable

from lathe.config import CleanConfig

# every C0/C1 control character and DEL, except \t (0x09) and \n (0x0a)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_MANY_BLANK_LINES = re.compile(r"\n{4,}")  # 4+ newlines in a row = 3+ blank lines


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def drop_control_chars(text: str) -> str:
    return _CONTROL.sub("", text.removeprefix("\ufeff"))


def strip_trailing_whitespace(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.split("\n"))


def collapse_blank_lines(text: str) -> str:
    """Runs of 3 or more blank lines become 2 (expects lines already stripped of trailing whitespace)."""
    return _MANY_BLANK_LINES.sub("\n\n\n", text)


def clean_text(text: str, normalization: str = "NFC", lowercase: bool = False) -> str:
    text = drop_control_chars(normalize_newlines(text))
    if normalization != "none":
        text = unicodedata.normalize(normalization, text)
    text = collapse_blank_lines(strip_trailing_whitespace(text))
    if lowercase:
        text = text.lower()
    return text.strip("\n")


_FTFY_CONFIG = None


def fix_unicode(text: str) -> str:
    """ftfy's encoding repairs. ftfy fixes text line by line, and a pure-ASCII line without escape sequences
    has nothing to repair, so only the other lines go through it (the same result, much faster)."""
    global _FTFY_CONFIG
    if _needs_no_fixing(text):
        return text
    import ftfy

    if _FTFY_CONFIG is None:
        _FTFY_CONFIG = ftfy.TextFixerConfig(unescape_html=False, uncurl_quotes=False, fix_latin_ligatures=False,
                                            fix_character_width=False, fix_line_breaks=False, normalization=None)
    lines = text.split("\n")
    last = len(lines) - 1
    return "".join(line + "\n" * (i < last) if _needs_no_fixing(line)
                   else ftfy.fix_text(line + "\n" * (i < last), config=_FTFY_CONFIG) for i, line in enumerate(lines))


def _needs_no_fixing(text: str) -> bool:
    return text.isascii() and "\x1b" not in text


def make_cleaner(cfg: CleanConfig) -> Callable[[str], str]:
    """The cleaning function data.clean describes."""
    def clean(text: str) -> str:
        if cfg.fix_unicode:
            text = fix_unicode(text)
        return clean_text(text, cfg.normalization, cfg.lowercase)
    return clean


def text_hash(text: str) -> str:
    """sha256 hex of the UTF-8 text: the document's identity for dedup, splitting and its id."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

"""Text cleaning: pure functions, str -> str. Conservative on purpose: code keeps its indentation and tabs.

clean_text applies, in order:
  1. line endings \\r\\n and \\r -> \\n
  2. drop control characters (Unicode category Cc) except \\n and \\t, and a leading byte-order mark
  3. Unicode NFC normalization (the same text always has the same bytes, so dedup sees it as equal)
  4. strip trailing whitespace on every line
  5. collapse runs of 3+ blank lines to 2
  6. strip leading and trailing blank lines (leading indentation of the first line is kept)
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

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


def clean_text(text: str) -> str:
    text = drop_control_chars(normalize_newlines(text))
    text = unicodedata.normalize("NFC", text)
    text = collapse_blank_lines(strip_trailing_whitespace(text))
    return text.strip("\n")


def text_hash(text: str) -> str:
    """sha256 hex of the UTF-8 text: the document's identity for dedup, splitting and its id."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

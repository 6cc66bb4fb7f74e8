"""Quality filters: datatrove's Gopher, C4 and FineWeb rules and its fastText language filter, built from
data.filters; every one off by default (they are written for web prose and would empty a code corpus).

datatrove splits words with spaCy or NLTK, which lathe does not install; lathe hands it `RegexWordTokenizer`
instead: words are runs of letters/digits/underscore, and runs of other non-space characters are tokens too.
That is what these rules need for space-delimited languages (not for Chinese, Japanese or Thai).

Language ID needs a fastText model file on disk (`filters.language.model_path`) and the `fasttext` package;
nothing is downloaded. Without them the filter is skipped, and the data card says why.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from datatrove.utils.word_tokenizers import WordTokenizer

from lathe.config import FiltersConfig

_WORD = re.compile(r"\w+|[^\w\s]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


class RegexWordTokenizer(WordTokenizer):
    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in _SENTENCE_END.split(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for sentence in self.sent_tokenize(text):
            start = text.index(sentence, start)
            spans.append((start, start + len(sentence)))
            start += len(sentence)
        return spans

    def __reduce__(self):  # one instance per process, so datatrove's lru_cache on tokenizers keeps working
        return (word_tokenizer, ())


_TOKENIZER: Optional[RegexWordTokenizer] = None


def word_tokenizer() -> RegexWordTokenizer:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = RegexWordTokenizer()
    return _TOKENIZER


def language_unavailable(cfg: FiltersConfig) -> str:
    """Why the language filter cannot run here ('' when it can)."""
    lang = cfg.language
    if not lang.model_path:
        return "skipped: no local model (set data.filters.language.model_path to a fastText LID model)"
    if not os.path.isfile(lang.model_path):
        return f"skipped: no local model ({lang.model_path} does not exist)"
    from datatrove.utils._import_utils import check_required_dependencies

    try:  # what datatrove's LanguageFilter itself requires
        check_required_dependencies("language ID", [("fasttext", "fasttext-numpy2-wheel"), "fasteners"])
    except ImportError as e:
        return f"skipped: {e}"
    return ""


def build_filters(cfg: FiltersConfig) -> list[tuple[str, object]]:
    """(name, datatrove filter) for every enabled filter, in the order they run."""
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)

    tok = word_tokenizer()
    built = []
    for name, section, cls in [("gopher_repetition", cfg.gopher_repetition, GopherRepetitionFilter),
                               ("gopher_quality", cfg.gopher_quality, GopherQualityFilter),
                               ("c4", cfg.c4, C4QualityFilter),
                               ("fineweb", cfg.fineweb, FineWebQualityFilter)]:
        if section.enabled:
            args = section.model_dump(exclude={"enabled"})
            for key in ("top_n_grams", "dup_n_grams"):
                if key in args:
                    args[key] = tuple(tuple(x) for x in args[key])
            built.append((name, cls(language=tok, **args)))
    if cfg.language.enabled and not language_unavailable(cfg):
        built.append(("language", _language_filter(cfg)))
    return built


def _language_filter(cfg: FiltersConfig):
    """datatrove's LanguageFilter with its model read from the local file instead of downloaded."""
    from datatrove.pipeline.filters import LanguageFilter
    from datatrove.utils.lid import FastTextLID

    class LocalFastTextLID(FastTextLID):
        def __init__(self, path: str, languages: list[str]):
            super().__init__(languages)
            self.path = path

        @property
        def model(self):
            if self._model is None:
                from fasttext.FastText import _FastText

                self._model = _FastText(self.path)
            return self._model

    lang = cfg.language
    step = LanguageFilter(languages=lang.languages, language_threshold=lang.threshold)
    step.model = LocalFastTextLID(lang.model_path, lang.languages)
    return step

"""The data stage: collect text from files, folders and globs (default: the Python stdlib), clean it,
drop too short/long and duplicate documents, split by content hash, and write
run.data/{train,val,test}.jsonl plus run.data/manifest.json.

    manifest = prepare_data(recipe.data, run)
    for row in read_split(run, "train"): row["id"], row["source"], row["text"]
"""

from lathe.data.clean import clean_text
from lathe.data.pipeline import SPLITS, prepare_data, read_split
from lathe.data.sources import default_sources

__all__ = ["SPLITS", "clean_text", "default_sources", "prepare_data", "read_split"]

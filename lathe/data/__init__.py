"""The data stage: read files, folders, globs and URLs (default: the Python stdlib), clean, scrub PII,
filter, deduplicate (exact and MinHash), decontaminate, mix sources by weight and split by content hash,
writing run.data/{train,val,test}.jsonl, manifest.json and a data card. Built on datatrove's pipeline
steps and executors (local, Slurm, Ray).

    manifest = prepare_data(recipe.data, run)
    for row in read_split(run, "train"): row["id"], row["source"], row["text"]
"""

from lathe.data.clean import clean_text
from lathe.data.pipeline import prepare_data, read_split
from lathe.data.sources import default_sources
from lathe.data.splits import SPLITS

__all__ = ["SPLITS", "clean_text", "default_sources", "prepare_data", "read_split"]

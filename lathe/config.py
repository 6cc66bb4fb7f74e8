"""Recipes: YAML files validated by typed models. A typo or an out-of-range value names the field.

A recipe has one section per stage. `load_recipe` reads a YAML file (or a built-in recipe by name),
applies `section.field=value` overrides from the command line, and validates the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lathe.errors import LatheError

RECIPES_DIR = Path(__file__).parent / "recipes"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- data: sources, cleaning, filters, dedup, mixture, execution (lathe/data) ----------------------
class DataSource(Section):
    """One entry of data.sources written as a mapping; a plain string is the same with the defaults."""
    path: str = Field(description="a file, folder, glob, or fsspec URL (hf://datasets/..., s3://...)")
    weight: float = Field(1.0, ge=0, description="mixture weight: 0.5 keeps half the documents, 2 repeats each twice in train")
    name: Optional[str] = Field(None, description="label in the manifest and data card (default: the folder or file name)")
    text_field: Optional[str] = Field(None, description="field holding the text in .jsonl/.parquet (default: data.text_field)")


class CleanConfig(Section):
    fix_unicode: bool = True  # ftfy: repair mojibake ("cafÃ©" -> "café"), C1 controls, terminal escapes
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    lowercase: bool = False


class BoilerplateConfig(Section):
    """Lines repeated at the start or end of many documents of a source (headers, footers, licence banners)."""
    enabled: bool = False
    edge_lines: int = Field(3, ge=1, description="lines at each end of a document that may be boilerplate")
    min_docs: int = Field(5, ge=2, description="a line is boilerplate if it is at the edges of at least this many documents")
    min_fraction: float = Field(0.01, ge=0, le=1, description="... and of at least this fraction of the source's documents")
    min_line_chars: int = Field(16, ge=1, description="shorter lines are never boilerplate ('}', 'Thanks!')")
    patterns: list[str] = Field(default_factory=list, description="regexes: matching lines are removed anywhere")


class PIIConfig(Section):
    emails: bool = True
    phones: bool = True
    ips: bool = True
    public_ips_only: bool = True  # 127.0.0.1 and 192.168.x.x are not personal
    email_replacement: str = "<EMAIL>"
    phone_replacement: str = "<PHONE>"
    ip_replacement: str = "<IP>"


class GopherQualityConfig(Section):
    """Gopher quality rules (Rae et al. 2021, table A1); the fields are datatrove's GopherQualityFilter arguments."""
    enabled: bool = False
    min_doc_words: Optional[int] = 50
    max_doc_words: Optional[int] = 100_000
    min_avg_word_length: Optional[float] = 3
    max_avg_word_length: Optional[float] = 10
    max_symbol_word_ratio: Optional[float] = 0.1
    max_bullet_lines_ratio: Optional[float] = 0.9
    max_ellipsis_lines_ratio: Optional[float] = 0.3
    max_non_alpha_words_ratio: Optional[float] = 0.8
    min_stop_words: Optional[int] = 2
    stop_words: Optional[list[str]] = None


class GopherRepetitionConfig(Section):
    """Gopher repetition rules: duplicate lines, paragraphs and n-grams (datatrove's GopherRepetitionFilter)."""
    enabled: bool = False
    dup_line_frac: Optional[float] = 0.3
    dup_para_frac: Optional[float] = 0.3
    dup_line_char_frac: Optional[float] = 0.2
    dup_para_char_frac: Optional[float] = 0.2
    top_n_grams: list[tuple[int, float]] = [(2, 0.2), (3, 0.18), (4, 0.16)]
    dup_n_grams: list[tuple[int, float]] = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]


class C4QualityConfig(Section):
    """C4 rules (Raffel et al. 2020): keeps lines ending in punctuation, drops pages with '{' or lorem ipsum."""
    enabled: bool = False
    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebQualityConfig(Section):
    """FineWeb's extra rules (Penedo et al. 2024): line punctuation, short lines, duplicated lines, list-like pages."""
    enabled: bool = False
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


class LanguageFilterConfig(Section):
    """fastText language ID. Needs a local model file: nothing is downloaded at run time."""
    enabled: bool = False
    languages: list[str] = ["en"]
    threshold: float = Field(0.65, ge=0, le=1)
    model_path: Optional[str] = Field(None, description="a local fastText LID model such as lid.176.bin")


class FiltersConfig(Section):
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    c4: C4QualityConfig = C4QualityConfig()
    fineweb: FineWebQualityConfig = FineWebQualityConfig()
    language: LanguageFilterConfig = LanguageFilterConfig()


class DedupConfig(Section):
    exact: bool = True  # same text after cleaning (sha256)
    near: bool = True  # MinHash LSH over word n-grams
    ngram: int = Field(5, ge=1, description="words per shingle")
    threshold: float = Field(0.8, gt=0, lt=1, description="Jaccard similarity at which documents count as near-duplicates")
    num_perm: int = Field(112, ge=2, le=1024, description="MinHash permutations; bands*rows when those are chosen")
    bands: Optional[int] = Field(None, ge=1, description="LSH bands; None = chosen from threshold and num_perm")
    rows: Optional[int] = Field(None, ge=1, description="hashes per band; None = chosen from threshold and num_perm")
    seed: int = 1

    @model_validator(mode="after")
    def _check(self):
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both dedup.bands and dedup.rows, or neither (then threshold and num_perm choose them)")
        return self


class EvalSetConfig(Section):
    path: str
    fields: list[str] = Field(default_factory=list, description="jsonl/parquet fields with text; [] = every string field")


class DecontaminateConfig(Section):
    """Drop training documents that share an n-gram with an evaluation set, so held-out tests stay held out."""
    sets: list[Union[str, EvalSetConfig]] = Field(default_factory=list, description="evaluation files (.jsonl, .txt, ...)")
    ngram: int = Field(13, ge=4, description="words per n-gram (GPT-3 used 13)")


class SlurmConfig(Section):
    partition: Optional[str] = None
    time: str = "12:00:00"
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: int = Field(2, ge=1)
    venv_path: Optional[str] = Field(None, description="activate script sourced by each job, e.g. .venv/bin/activate")
    sbatch_args: dict[str, str] = Field(default_factory=dict)


class RayConfig(Section):
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: float = Field(2, gt=0)


class DataConfig(Section):
    sources: list[Union[str, DataSource]] = Field(
        default_factory=list, description="files, folders, globs or URLs (or {path, weight, name}); empty = Python stdlib sources")
    extensions: list[str] = [".txt", ".md", ".py", ".jsonl", ".jsonl.gz", ".parquet", ".html", ".htm"]
    text_field: str = "text"  # the field holding the text in .jsonl/.parquet files
    min_chars: int = Field(32, ge=0)
    max_chars: int = Field(100_000, gt=0)
    max_total_bytes: Optional[int] = Field(None, gt=0, description="read at most this many input bytes, shared evenly by sources")
    val_fraction: float = Field(0.05, ge=0, lt=1)
    test_fraction: float = Field(0.05, ge=0, lt=1)
    on_decode_error: Literal["skip", "replace", "repair"] = Field(
        "repair", description="invalid UTF-8: skip the file, replace bad bytes with U+FFFD, or repair them as cp1252")
    on_bad_record: Literal["error", "skip"] = Field("error", description="a malformed .jsonl line or parquet row")
    split_long_files: bool = Field(True, description="cut plain-text files over max_chars at blank lines into documents")
    clean: CleanConfig = CleanConfig()
    boilerplate: BoilerplateConfig = BoilerplateConfig()
    pii: PIIConfig = PIIConfig()
    filters: FiltersConfig = FiltersConfig()
    dedup: DedupConfig = DedupConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    executor: Literal["local", "slurm", "ray"] = "local"
    tasks: Optional[int] = Field(None, ge=1, description="shards; None = one per shard_mb of input (same on any machine)")
    shard_mb: float = Field(64, gt=0)
    workers: Optional[int] = Field(None, ge=1, description="local processes at a time; None = one per CPU core")
    work_dir: Optional[str] = Field(None, description="intermediate files; None = <run>/data/work (a URL on clusters)")
    keep_work: bool = False  # keep the intermediate files after a successful run
    slurm: SlurmConfig = SlurmConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.min_chars >= self.max_chars:
            raise ValueError("min_chars must be smaller than max_chars")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class TokenizerConfig(Section):
    vocab_size: int = Field(4096, ge=269, le=1 << 20, description="269 = the 256 bytes and 13 special tokens, no merges")
    min_frequency: int = Field(2, ge=1)
    split_digits: bool = True
    max_train_bytes: Optional[int] = Field(None, gt=0, description="train BPE on at most this much text")


class ModelConfig(Section):
    vocab_size: Optional[int] = Field(None, gt=0, description="None: taken from the tokenizer")
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_head: Optional[int] = Field(None, ge=1, description="grouped-query attention; None = n_head")
    n_embd: int = Field(128, ge=8)
    block_size: int = Field(256, ge=8)
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    mlp_hidden: Optional[int] = Field(None, ge=1, description="None: 4*n_embd for gelu, ~8/3*n_embd for swiglu")
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    pos_emb: Literal["rope", "learned"] = "rope"
    bias: bool = False
    tie_embeddings: bool = True
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    direction: Literal["forward", "backward"] = Field(
        "forward", description="backward: trained on the token stream back to front (ULMFiT's backward LM, "
        "ensembled with a forward one); it reads texts reversed and does not generate")

    @model_validator(mode="after")
    def _check(self):
        kv = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % kv:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({kv})")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rope needs an even head dimension")
        return self


class TrainConfig(Section):
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch per process")
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(500, ge=1)
    max_time_s: Optional[float] = Field(None, gt=0, description="stop early once this wall time is spent")
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(30, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    wsd_decay_fraction: float = Field(0.2, gt=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    eval_every: int = Field(100, ge=1)
    eval_tokens: int = Field(32768, ge=1, description="validation tokens per evaluation")
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    early_stop_patience: Optional[int] = Field(None, ge=1, description="evaluations without improvement")
    log_every: int = Field(10, ge=1)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False


class EvalConfig(Section):
    max_tokens: int = Field(65536, ge=1, description="tokens of the test split to score")


class GenerateConfig(Section):
    prompt: str = "def "
    num_samples: int = Field(3, ge=1)
    max_tokens: int = Field(200, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_k: Optional[int] = Field(50, ge=1)
    top_p: Optional[float] = Field(0.95, gt=0, le=1)
    stop: list[str] = []
    seed: int = 0


class Recipe(Section):
    name: str = "default"
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    generate: GenerateConfig = GenerateConfig()


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown field (typo?)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  field '{field}': {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], object]:
    """'train.lr=1e-3' -> (['train', 'lr'], 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise LatheError(f"override '{text}' must look like section.field=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else ""


def load_recipe(recipe: str | Path | None = None, overrides: list[str] | dict | None = None) -> Recipe:
    """Load a recipe file or a built-in recipe name ('default', 'tiny'), apply overrides, validate."""
    raw, source = read_recipe_file(recipe) if recipe is not None else ({}, "built-in defaults")
    apply_overrides(raw, overrides)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise LatheError(format_validation_error(e, source)) from None


def read_recipe_file(recipe: str | Path, what: str = "recipe", builtins: str = "*.yaml") -> tuple[dict, str]:
    """The raw mapping of a YAML path or a built-in name (lathe/recipes/<name>.yaml), and its path."""
    path = Path(recipe)
    if not path.exists() and (RECIPES_DIR / f"{recipe}.yaml").exists():
        path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob(builtins)))
        raise LatheError(f"{what} '{recipe}' not found (a YAML path, or one of: {known})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LatheError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise LatheError(f"{path}: a {what} must be a mapping of sections")
    return raw, str(path)


def apply_overrides(raw: dict, overrides: list[str] | dict | None) -> dict:
    """Set each "section.field=value" override (or {"section.field": value}) in the raw mapping, in place."""
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for keys, value in items:
        keys = keys.split(".") if isinstance(keys, str) else keys
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise LatheError(f"override {'.'.join(keys)}: '{k}' is not a section")
        node[keys[-1]] = value
    return raw


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)

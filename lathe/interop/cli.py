"""CLI verbs for moving models in and out of lathe:

    lathe export --run RUN --out DIR                        a run -> Hugging Face folder
    lathe import HF_DIR --name RUN                          Hugging Face folder -> a new run
    lathe adapter merge --base RUN --adapter DIR --out RUN2  fold a LoRA adapter into a new run

A RUN given as a bare name lives under runs/; anything with a '/' is a path. The runs made here hold
a checkpoint (step 0, no optimizer state), the tokenizer and a recipe whose model section matches,
which is what `lathe generate --run` and the fine-tuning verbs read. (`lathe eval` also needs token
shards, made by the data and tokenizer stages.) Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def register(sub) -> None:
    p = sub.add_parser("export", help="write a run's model and tokenizer as a Hugging Face folder")
    p.add_argument("--run", help="run directory (default: the newest run under runs/)")
    p.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("import", help="make a run from a local Hugging Face GPT-2 or Llama folder")
    p.add_argument("hf_dir", help="folder with config.json, *.safetensors and tokenizer files")
    p.add_argument("--name", required=True, help="new run: a name under runs/ or a path")
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser("adapter", help="LoRA adapter tools")
    verbs = p.add_subparsers(dest="adapter_command", required=True)
    m = verbs.add_parser("merge", help="merge a LoRA adapter into its base model, as a new run")
    m.add_argument("--base", required=True, help="run directory of the base model")
    m.add_argument("--adapter", required=True, help="adapter folder (lathe.finetune.lora.save_adapter)")
    m.add_argument("--out", required=True, help="new run: a name under runs/ or a path")
    m.set_defaults(handler=cmd_adapter_merge)


def new_run(name_or_path: str):
    """A bare name goes under runs/ (and becomes runs/latest); a path is used as given. Never an
    existing run: its checkpoints would be mixed with the new model's."""
    from lathe.errors import LatheError
    from lathe.rundir import RUNS_ROOT, RunDir

    path = Path(name_or_path)
    bare = path.parent == Path(".")
    if (RUNS_ROOT / path if bare else path).joinpath("checkpoints").exists():
        raise LatheError(f"{RUNS_ROOT / path if bare else path} already holds a run: pick a new name")
    if bare:
        return RunDir.create(name_or_path)
    path.mkdir(parents=True, exist_ok=True)
    return RunDir(path)


def save_as_run(run, model, tokenizer, recipe, provenance: dict) -> None:
    """Checkpoint at step 0 (no optimizer state), tokenizer and recipe: what the stage verbs read."""
    from lathe.pipeline import save_recipe
    from lathe.train.checkpoint import save_checkpoint

    save_checkpoint(run.checkpoints, 0, model, None, {"source": provenance})
    if tokenizer is not None:
        tokenizer.save(run.tokenizer)
    save_recipe(run, recipe.model_copy(update={"model": model.cfg}))


def cmd_export(args) -> int:
    from lathe.console import info
    from lathe.interop.hf import export_hf
    from lathe.rundir import RunDir
    from lathe.tokenizer import Tokenizer
    from lathe.train.checkpoint import load_model

    run = RunDir.resolve(args.run)
    model = load_model(run.path)
    tokenizer = Tokenizer.from_file(run.tokenizer) if run.tokenizer.exists() else None
    export_hf(model, tokenizer, args.out)
    info(f"export: {run.path} -> {args.out} ({model.num_params():,} parameters"
         f"{'' if tokenizer else ', no tokenizer in the run'})")
    return 0


def cmd_import(args) -> int:
    from lathe.config import Recipe
    from lathe.console import info, warn
    from lathe.interop.hf import import_hf

    model, tokenizer = import_hf(args.hf_dir)
    run = new_run(args.name)
    save_as_run(run, model, tokenizer, Recipe(name=run.path.name), {"import": str(Path(args.hf_dir).resolve())})
    if tokenizer is None:
        kept = _copy_foreign_tokenizer(Path(args.hf_dir), run.path / "hf_tokenizer")
        warn(f"{run.path} has no lathe tokenizer, which `lathe generate/eval` need"
             + (f"; the folder's own tokenizer files are in {kept} for transformers.AutoTokenizer" if kept else ""))
    info(f"import: {args.hf_dir} -> {run.path} ({model.num_params():,} parameters)")
    return 0


def _copy_foreign_tokenizer(src: Path, dst: Path) -> Path | None:
    """Keep a non-lathe tokenizer beside the run (transformers can still use it); dst, or None if none."""
    files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not files:
        return None
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dst / f.name)
    return dst


def cmd_adapter_merge(args) -> int:
    from lathe.config import Recipe, load_recipe
    from lathe.console import info
    from lathe.finetune.lora import load_adapter, merge_adapter
    from lathe.rundir import RunDir
    from lathe.tokenizer import Tokenizer
    from lathe.train.checkpoint import load_model

    base = RunDir.resolve(args.base)
    merged = merge_adapter(load_adapter(load_model(base.path), args.adapter), in_place=True)
    tokenizer = Tokenizer.from_file(base.tokenizer) if base.tokenizer.exists() else None
    out = new_run(args.out)
    recipe = load_recipe(base.recipe) if base.recipe.exists() else Recipe(name=out.path.name)
    save_as_run(out, merged, tokenizer, recipe,
                {"merge": {"base": str(base.path.resolve()), "adapter": str(Path(args.adapter).resolve())}})
    info(f"adapter merge: {base.path} + {args.adapter} -> {out.path}")
    return 0

"""Checkpoints: safetensors weights + optimizer state + a JSON state, written atomically.

checkpoints/step-000200/{model.safetensors, optim.pt, state.json}; `checkpoints/latest` names the
newest complete one. A directory appears under its final name only once fully written, so a kill
at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import safetensors.torch as st

from lathe.config import ModelConfig
from lathe.errors import LatheError
from lathe.io import atomic_path, read_json, write_json, write_text
from lathe.model import GPT


def save_checkpoint(ckpt_root: Path, step: int, model: GPT, optimizer, state: dict, keep: int = 2) -> Path:
    name = f"step-{step:06d}"
    final = ckpt_root / name
    with atomic_path(final) as tmp:
        tmp.mkdir()
        st.save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "optim.pt")
        write_json(tmp / "state.json", {"step": step, "model": model.cfg.model_dump(), **state})
    write_text(ckpt_root / "latest", name + "\n")
    _prune(ckpt_root, keep, protect={name, state.get("best_checkpoint")})
    return final


def _prune(ckpt_root: Path, keep: int, protect: set) -> None:
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest"
    if not pointer.exists():
        return None
    path = ckpt_root / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, a checkpoints/ dir or a run dir -> the checkpoint dir to load."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "state.json").exists():
            return candidate
        found = latest_checkpoint(candidate)
        if found is not None:
            return found
    raise LatheError(f"no checkpoint found at {path} (expected model.safetensors + state.json)")


def load_state(ckpt: Path) -> dict:
    return read_json(ckpt / "state.json")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    ckpt = resolve_checkpoint(path)
    cfg = ModelConfig.model_validate(load_state(ckpt)["model"])
    model = GPT(cfg)
    load_weights(model, ckpt)
    return model.to(device)


def load_weights(model: GPT, ckpt: Path) -> None:
    missing, unexpected = st.load_model(model, str(ckpt / "model.safetensors"), strict=False)
    # tied lm_head shares the embedding and may be stored once only
    missing = [m for m in missing if not (m == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise LatheError(f"{ckpt}: weights do not match the model (missing {missing}, unexpected {unexpected})")


def restore(ckpt: Path, model: GPT, optimizer, state: dict) -> int:
    """Resume from a checkpoint: weights, optimizer and RNG, and the saved values of `state`'s keys
    (updated in place). Returns the checkpoint's step."""
    load_weights(model, ckpt)
    load_optimizer(optimizer, ckpt)
    saved = load_state(ckpt)
    state.update({k: saved[k] for k in state if k in saved})
    return saved["step"]


def load_optimizer(optimizer, ckpt: Path) -> None:
    blob = torch.load(ckpt / "optim.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"])

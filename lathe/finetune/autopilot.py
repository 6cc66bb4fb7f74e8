"""Autopilot: one frozen base model shared by several task adapters, switched at generation time.

    pilot = Autopilot(load_model("runs/base"), tok)
    pilot.add_adapter("math", "adapters/math")      # each adapter is its own small folder
    pilot.add_adapter("code", "adapters/code")
    pilot.use("math");  pilot.generate("2+2=", max_tokens=8)
    pilot.use(None);    pilot.generate("2+2=", max_tokens=8)   # the plain base model

The base weights are loaded once and never copied or changed: every adapter lives beside them as
LoRA branches inside the same linear layers (peft's multi-adapter support), and switching only
changes which branch runs, so it costs nothing. `pilot.model` is the GPT to hand to any lathe code
that takes a model (`lathe.generate.stream_ids`, evaluation); it runs with the active adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lathe.errors import LatheError
from lathe.finetune.lora import load_adapter
from lathe.generate import generate


class Autopilot:
    def __init__(self, base_model, tokenizer):
        self.model = base_model.requires_grad_(False).eval()  # adapters are injected into this GPT in place
        self.tokenizer = tokenizer
        self.active: str | None = None
        self._peft = None  # the peft wrapper, created with the first adapter

    def adapters(self) -> list[str]:
        return list(self._peft.peft_config) if self._peft is not None else []

    def add_adapter(self, name: str, folder: str | Path) -> None:
        """Load an adapter beside the others; the active choice does not change."""
        if not name or name in self.adapters():
            raise LatheError(f"adapter name '{name}' is empty or already taken (have: {', '.join(self.adapters())})")
        self._peft = load_adapter(self._peft if self._peft is not None else self.model, folder, adapter_name=name)
        self.use(self.active)

    def use(self, name: str | None) -> None:
        """Make `name` the adapter generation runs with; None runs the plain base model."""
        if name is not None and name not in self.adapters():
            raise LatheError(f"no adapter named '{name}' (have: {', '.join(self.adapters()) or 'none'})")
        if self._peft is not None:
            if name is None:
                self._peft.base_model.disable_adapter_layers()
            else:
                self._peft.base_model.enable_adapter_layers()
                self._peft.set_adapter(name, inference_mode=True)
        self.active = name

    @torch.no_grad()
    def generate(self, prompt: str, **sampling) -> list[str]:
        """`lathe.generate.generate` with the active adapter (max_tokens, num_samples, temperature, ...)."""
        return generate(self.model, self.tokenizer, prompt, **sampling)

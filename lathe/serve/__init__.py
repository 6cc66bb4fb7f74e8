"""Serving a trained model: the generation engine and what it builds on.

- `engine`: batched, streamed generation with a KV cache (`Engine`, `Request`, `Result`, `Delta`)
- `constrained`: outputs that must match a JSON schema, a regex or a Lark grammar (llguidance)
- `tools`: the calculator and sandboxed Python the model can call through the tool-call tokens
- `memory`: per-task knowledge in SQLite (FTS5 + sqlite-vec) retrieved into prompts
- `memory_cli`: `lathe memory add|search|list|remove`

Kept empty of imports so `lathe --help` stays fast: import the submodule you need.
"""

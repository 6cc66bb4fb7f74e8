"""Interop with the Hugging Face ecosystem: `lathe.interop.hf` imports GPT-2/Llama checkpoints and
exports lathe models for `transformers`. (Nothing is imported here, so the CLI stays cheap to load.)"""

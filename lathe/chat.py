"""lathe's chat template: messages -> token ids, with a mask of the tokens the model should learn.

    <|bos|><|system_start|>...<|system_end|>
    <|user_start|>...<|user_end|>
    <|assistant_start|>...<|tool_call_start|>{json}<|tool_call_end|>...<|assistant_end|>
    <|tool_result_start|>...<|tool_result_end|>

The template is built from ids, never by parsing text, so a user typing "<|assistant_end|>" stays
plain text. Only assistant tokens (content, tool calls and the closing <|assistant_end|>) are trained.
"""

from __future__ import annotations

import json

from lathe.errors import LatheError

ROLE_TOKENS = {
    "system": ("<|system_start|>", "<|system_end|>"),
    "user": ("<|user_start|>", "<|user_end|>"),
    "assistant": ("<|assistant_start|>", "<|assistant_end|>"),
    "tool": ("<|tool_result_start|>", "<|tool_result_end|>"),
}


def validate_messages(messages, where: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise LatheError(f"{where}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLE_TOKENS:
            raise LatheError(f"{where}[{i}]: needs a 'role' among {sorted(ROLE_TOKENS)}")
        if not isinstance(m.get("content", ""), str):
            raise LatheError(f"{where}[{i}].content: must be a string")
    return messages


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids and a same-length loss mask (True = an assistant token to learn)."""
    validate_messages(messages)
    ids, mask = [tokenizer.bos_id], [False]

    def add(tokens: list[int], learn: bool) -> None:
        ids.extend(tokens)
        mask.extend([learn] * len(tokens))

    for m in messages:
        start, end = (tokenizer.special_id(t) for t in ROLE_TOKENS[m["role"]])
        learn = m["role"] == "assistant"
        add([start], False)
        add(tokenizer.encode(m.get("content", "")), learn)
        for call in m.get("tool_calls", []) or []:
            add([tokenizer.special_id("<|tool_call_start|>")], learn)
            add(tokenizer.encode(json.dumps(call, ensure_ascii=False)), learn)
            add([tokenizer.special_id("<|tool_call_end|>")], learn)
        add([end], learn)
    if add_generation_prompt:
        add([tokenizer.special_id("<|assistant_start|>")], False)
    return ids, mask

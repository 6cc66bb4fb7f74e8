"""Constrained decoding: an untrained model's outputs always match the schema / regex / grammar."""

import json
import re

import jsonschema
import pytest
import torch

from lathe.config import ModelConfig, TokenizerConfig
from lathe.errors import LatheError
from lathe.model import GPT
from lathe.serve.constrained import Constraint
from lathe.serve.engine import Engine, Request
from lathe.tokenizer import train_tokenizer

CORPUS = [
    '{"name": "ada", "age": 36, "tags": ["math", "engines"], "ok": true, "color": "green"}',
    "The quick brown fox jumps over the lazy dog; 0123456789 are the digits.",
    'def point(x, y):\n    return {"x": x, "y": y, "label": "alpha"}',
] * 3

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "email"],
          "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,7}$"},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "email": {"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{1,6}\\.(com|org)$"}}}
SETTINGS = {"type": "object", "additionalProperties": False, "required": ["color", "ok", "scores"],
            "properties": {"color": {"enum": ["red", "green", "blue"]},
                           "ok": {"type": "boolean"},
                           "scores": {"type": "array", "maxItems": 3,
                                      "items": {"type": "integer", "minimum": -9, "maximum": 99}}}}
SHAPE = {"type": "object", "additionalProperties": False, "required": ["point", "label"],
         "properties": {"point": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                                  "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50},
                                                 "y": {"enum": [0, 0.5, 1]}}},
                        "label": {"type": "string", "enum": ["alpha", "beta"]},
                        "note": {"type": ["string", "null"], "maxLength": 5}}}


@pytest.fixture(scope="module")
def engine() -> Engine:
    tok = train_tokenizer(CORPUS, TokenizerConfig(vocab_size=360, min_frequency=1))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=160))
    return Engine(model.eval(), tok)


def ask(schema_name: str) -> list[dict]:
    return [{"role": "user", "content": f"Reply with a {schema_name} as JSON."}]


def test_200_generations_against_three_schemas_all_parse_and_validate(engine):
    schemas = {"person": PERSON, "settings": SETTINGS, "shape": SHAPE}
    requests = [Request(messages=ask(name), constraint=Constraint.json_schema(schema), n=n, max_tokens=120,
                        temperature=1.0, seed=i)
                for i, ((name, schema), n) in enumerate(zip(schemas.items(), (67, 67, 66)))]
    results = engine.generate(requests)  # one batch of 200 rows
    outputs = 0
    for schema, result in zip(schemas.values(), results):
        for choice in result.choices:
            assert choice.finish_reason == "stop", choice.text
            jsonschema.validate(json.loads(choice.text), schema)
            outputs += 1
    assert outputs == 200
    assert len({c.text for r in results for c in r.choices}) > 150  # real sampling, not one forced answer


def test_without_the_constraint_the_same_model_writes_no_json(engine):
    [r] = engine.generate([Request(messages=ask("person"), n=20, max_tokens=40, temperature=1.0, seed=0)])
    assert not any(_parses(c.text) for c in r.choices)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def test_regex_and_lark_constraints(engine):
    pattern = r"[A-Z]{2}-[0-9]{3}( ok)?"
    grammar = 'start: answer " because " REASON\nanswer: "yes" | "no"\nREASON: /[a-z]{3,8}/'
    regex_result, lark_result = engine.generate([
        Request(prompt="Code:", constraint=Constraint.regex(pattern), n=20, max_tokens=30, seed=1),
        Request(prompt="Answer:", constraint=Constraint.lark(grammar), n=20, max_tokens=30, seed=2),
    ])
    for c in regex_result.choices:
        assert re.fullmatch(pattern, c.text) and c.finish_reason == "stop", c.text
    for c in lark_result.choices:
        assert re.fullmatch(r"(yes|no) because [a-z]{3,8}", c.text) and c.finish_reason == "stop", c.text


def test_greedy_picks_the_best_allowed_token(engine):
    """The mask removes tokens but keeps the model's order among the rest."""
    [r] = engine.generate([Request(prompt="x", constraint=Constraint.regex("[0-9]"), temperature=0, max_tokens=3)])
    ids = r.prompt_ids
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids]))[0][0, -1]
    digits = [engine.tokenizer.encode(str(d))[0] for d in range(10)]
    best = max(digits, key=lambda t: logits[t])
    assert r.choices[0].token_ids == [best]


def test_bad_constraints_fail_before_decoding(engine):
    with pytest.raises(LatheError, match="json_schema"):
        engine.stream(Request(prompt="x", constraint=Constraint.json_schema({"type": "strin"})))
    with pytest.raises(LatheError, match="regex"):
        engine.stream(Request(prompt="x", constraint=Constraint.regex("[0-9]+(")))
    with pytest.raises(LatheError, match="lark"):
        engine.stream(Request(prompt="x", constraint=Constraint.lark("start: undefined_rule")))
    with pytest.raises(LatheError, match="kind"):
        engine.generate([{"prompt": "x", "constraint": {"kind": "xml", "spec": "<a/>"}}])


def test_running_out_of_tokens_is_reported_as_length(engine):
    [r] = engine.generate([Request(prompt="{", constraint=Constraint.json_schema(PERSON), max_tokens=4, seed=0)])
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].text.startswith('{"')  # a valid prefix, unfinished

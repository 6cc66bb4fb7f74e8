"""Tools: the calculator, tool-call parsing, and the engine running a call and feeding the result back."""

import json
import math

import pytest
import torch

from lathe.chat import render_chat
from lathe.config import ModelConfig, TokenizerConfig
from lathe.model import GPT
from lathe.serve.constrained import Constraint
from lathe.serve.engine import Engine, Request
from lathe.serve.tools import ToolError, calculate, format_number, run_tool_call, tool_specs
from lathe.tokenizer import train_tokenizer

CORPUS = ['{"name": "calculator", "arguments": {"expression": "6*7"}} The answer is 42.',
          "Numbers 0 1 2 3 4 5 6 7 8 9 and words: the result of the tool call."] * 3
CALL = {"name": "calculator", "arguments": {"expression": "6*7"}}
MESSAGES = [{"role": "user", "content": "What is 6*7?"}]


@pytest.fixture(scope="module")
def engine() -> Engine:
    tok = train_tokenizer(CORPUS, TokenizerConfig(vocab_size=320, min_frequency=1))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=128))
    return Engine(model.eval(), tok)


def forced_call(call: dict, then: str = "/[0-9]{1,3}/") -> Constraint:
    """A grammar that makes even a random model write `call`, then (after the result) `then`."""
    return Constraint.lark(f"start: <|tool_call_start|> CALL <|tool_call_end|> ANSWER\n"
                           f"CALL: {json.dumps(json.dumps(call))}\nANSWER: {then}")


@pytest.mark.parametrize("expression, value", [
    ("6*7", 42), ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("7 / 2", 3.5), ("7 // 2", 3), ("-7 % 3", 2),
    ("2 ** 10", 1024), ("sqrt(16) + abs(-2)", 6.0), ("max(1, 5, 3) - min(4, 2)", 3), ("round(pi, 3)", 3.142),
    ("1e3 + 0.5", 1000.5), ("-(-3)", 3)])
def test_calculator_evaluates_arithmetic(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression", [
    "__import__('os').system('echo hi')", "x + 1", "(1).real", "open('f')", "[1, 2]", "1 if 2 else 3",
    "9 ** 9 ** 9", "1 / 0", "sqrt(-1)", "lambda: 1", "2 +", "'a' * 3", "True + 1", "(-8) ** 0.5", "1" * 600])
def test_calculator_refuses_everything_else(expression):
    with pytest.raises(ToolError):
        calculate(expression)


def test_numbers_are_formatted_for_a_model():
    assert format_number(2.0) == "2" and format_number(3.5) == "3.5" and format_number(10**20) == str(10**20)
    assert format_number(math.pi) == "3.14159265359"


def test_tool_calls_parse_and_errors_become_results():
    assert run_tool_call(json.dumps(CALL)).result == "42"
    string_args = run_tool_call('{"name": "calculator", "arguments": "{\\"expression\\": \\"1+1\\"}"}')
    assert string_args.result == "2" and string_args.arguments == {"expression": "1+1"}
    assert run_tool_call("{not json").result.startswith("error: tool call is not JSON")
    assert run_tool_call('{"name": "shell", "arguments": {}}').result.startswith("error: unknown tool 'shell'")
    assert run_tool_call('{"name": "calculator", "arguments": {"expr": "1"}}').result.startswith("error:")
    assert run_tool_call('{"name": "calculator", "arguments": {"expression": "1/0"}}').result == "error: division by zero"
    assert {s["function"]["name"] for s in tool_specs()} == {"calculator", "python"}


def test_the_engine_runs_the_call_and_feeds_the_result_back(engine):
    tok = engine.tokenizer
    request = Request(messages=MESSAGES, constraint=forced_call(CALL), tools=True, temperature=0, max_tokens=60,
                      logprobs=True)
    deltas = list(engine.stream(request))
    [choice] = deltas[-1].result.choices
    [call] = choice.tool_calls
    assert (call.name, call.arguments, call.result) == ("calculator", {"expression": "6*7"}, "42")
    assert [d.tool_call for d in deltas if d.tool_call] == [call]
    assert choice.finish_reason == "stop" and choice.text.isdigit()  # the answer after the result
    # the transcript is exactly the chat template of: the call, the tool's result, a new assistant turn
    prompt = deltas[-1].result.prompt_ids
    transcript = prompt + choice.token_ids
    expected, _ = render_chat(tok, conversation_with_result("42"), add_generation_prompt=True)
    assert tok.decode(transcript) == tok.decode(expected) + choice.text
    # the model saw the result: the answer's log-probabilities are those of the model reading the
    # whole transcript at once, and differ from the same transcript with another result
    n_answer = len(tok.encode(choice.text))
    answer_logprobs = choice.logprobs[-n_answer:]
    assert answer_logprobs == pytest.approx(uncached_logprobs(engine.model, transcript, n_answer), abs=2e-5)
    start, end = transcript.index(tok.special_id("tool_result_start")), transcript.index(tok.special_id("tool_result_end"))
    assert tok.decode(transcript[start + 1:end]) == "42"
    assert choice.logprobs[start - len(prompt)] is None  # fed-back tokens are not the model's
    wrong = transcript[: start + 1] + tok.encode("41") + transcript[end:]
    other = uncached_logprobs(engine.model, wrong, n_answer)
    assert max(abs(a - b) for a, b in zip(answer_logprobs, other)) > 1e-4  # a random model is barely moved, but moved


def conversation_with_result(result: str) -> list[dict]:
    return MESSAGES + [{"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "content": result}]


def uncached_logprobs(model, ids: list[int], last: int) -> list[float]:
    """Log-probabilities of the last `last` tokens of ids, from one forward pass over all of ids."""
    with torch.no_grad():
        logprobs = model(torch.tensor([ids]))[0][0].float().log_softmax(-1)
    return [logprobs[t - 1, ids[t]].item() for t in range(len(ids) - last, len(ids))]


def test_calls_the_engine_does_not_run_end_the_sample(engine):
    for request in (Request(messages=MESSAGES, constraint=forced_call(CALL), tools=False, temperature=0),
                    Request(messages=MESSAGES, constraint=forced_call(CALL), tools=True, max_tool_rounds=0)):
        [r] = engine.generate([request])
        [choice] = r.choices
        assert choice.finish_reason == "tool_calls" and choice.text == ""
        [call] = choice.tool_calls
        assert (call.name, call.arguments, call.result) == ("calculator", {"expression": "6*7"}, None)
        assert choice.token_ids[-1] == engine.tokenizer.special_id("tool_call_end")


def test_python_tool_runs_in_the_sandbox():
    pytest.importorskip("lathe.verify.sandbox", reason="the sandbox area is not built yet")
    call = run_tool_call(json.dumps({"name": "python", "arguments": {"code": "print(sum(range(10)))"}}))
    assert call.result.strip() == "45"
    failing = run_tool_call(json.dumps({"name": "python", "arguments": {"code": "raise SystemExit(3)"}}))
    assert failing.result.startswith("error:")

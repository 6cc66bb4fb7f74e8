"""Tools the model can call while it generates: a calculator and a sandboxed Python runner.

A call is written by the model between the reserved tokens, as lathe's chat template renders it:

    <|tool_call_start|>{"name": "calculator", "arguments": {"expression": "6*7"}}<|tool_call_end|>

The engine parses it (`run_tool_call`), runs the tool, and feeds the result back exactly as
`render_chat` renders an assistant tool call followed by a tool message:

    <|assistant_end|><|tool_result_start|>42<|tool_result_end|><|assistant_start|>

Tools never raise to the engine: a malformed call, an unknown tool or a failing expression becomes
a result that starts with "error:", which the model reads like any other result.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from dataclasses import dataclass, field
from typing import Callable

MAX_RESULT_CHARS = 2000  # results go into a small context: keep them short
MAX_EXPRESSION_CHARS = 500
MAX_INT_BITS = 4096  # about 1200 digits: no 9**9**9 that eats the machine
PYTHON_TIMEOUT_S = 5.0
PYTHON_MEMORY_MB = 256


class ToolError(Exception):
    """A call the tool cannot serve; its message goes back to the model as the result."""


@dataclass
class ToolCall:
    """One call the model made, with the result fed back (None when the engine did not run it)."""

    name: str
    arguments: dict
    result: str | None = None
    raw: str = ""  # the text the model wrote between the tool-call tokens

    def as_message_call(self) -> dict:
        """The call as `render_chat` expects it in an assistant message's tool_calls."""
        return {"name": self.name, "arguments": self.arguments}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    run: Callable[[dict], str] = field(repr=False)

    def spec(self) -> dict:
        """OpenAI's function-tool format, for a server to advertise."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


# --- calculator -------------------------------------------------------------------------------
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log,
              "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan,
              "floor": math.floor, "ceil": math.ceil}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def calculate(expression: str) -> int | float:
    """Evaluate arithmetic by walking its syntax tree: numbers, + - * / // % **, parentheses and a few
    math functions. Nothing else parses (no names, attributes, calls to anything else), so no eval."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None
    try:
        return _evaluate(tree.body)
    except (ZeroDivisionError, OverflowError, ValueError, TypeError) as e:
        raise ToolError(str(e) or type(e).__name__) from None


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _bounded(_BINARY[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords):
        return _bounded(_FUNCTIONS[node.func.id](*[_evaluate(a) for a in node.args]))
    raise ToolError(f"unsupported in the calculator: {ast.unparse(node)!r}")


def _check_power(base, exponent) -> None:
    """Refuse integer powers whose result would be astronomically large before computing them."""
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0:
        if exponent * math.log2(abs(base)) > MAX_INT_BITS:
            raise ToolError("result too large")


def _bounded(value):
    if isinstance(value, complex):
        raise ToolError("complex result")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError("result too large")
    return value


def format_number(value: int | float) -> str:
    """Integers as integers (2.0 -> "2"), other floats with 12 significant digits."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format(value, ".12g") if isinstance(value, float) else str(value)


def _run_calculator(arguments: dict) -> str:
    expression = arguments.get("expression")
    if not isinstance(expression, str):
        raise ToolError('calculator needs {"expression": "<arithmetic>"}')
    return format_number(calculate(expression))


# --- python -----------------------------------------------------------------------------------
def _run_python(arguments: dict) -> str:
    code = arguments.get("code")
    if not isinstance(code, str):
        raise ToolError('python needs {"code": "<program that prints its answer>"}')
    from lathe.verify.sandbox import run_python  # imported on use: the sandbox is its own area

    r = run_python(code, timeout_s=PYTHON_TIMEOUT_S, memory_mb=PYTHON_MEMORY_MB)
    if r.ok:
        return r.stdout if r.stdout.strip() else "(no output)"
    reason = r.killed_reason or f"exit code {r.returncode}"
    return f"error: {reason}\n{r.stdout}{_last_lines(r.stderr, 8)}".rstrip()


def _last_lines(text: str, n: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


TOOLS: dict[str, Tool] = {
    "calculator": Tool(
        "calculator", "Evaluate an arithmetic expression: + - * / // % **, parentheses, sqrt, log, sin, ...",
        {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"],
         "additionalProperties": False},
        _run_calculator),
    "python": Tool(
        "python", "Run a short Python program in a sandbox (no network, limited time and memory) and "
                  "return what it prints.",
        {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"],
         "additionalProperties": False},
        _run_python),
}


def tool_specs() -> list[dict]:
    return [tool.spec() for tool in TOOLS.values()]


# --- calls ------------------------------------------------------------------------------------
def parse_tool_call(text: str) -> tuple[str, dict]:
    """'{"name": ..., "arguments": {...}}' -> (name, arguments); arguments may also be JSON text."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError as e:
        raise ToolError(f"tool call is not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ToolError('tool call must look like {"name": "...", "arguments": {...}}')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI's wire format carries arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise ToolError("tool call arguments are not JSON") from None
    if not isinstance(arguments, dict):
        raise ToolError("tool call arguments must be an object")
    return call["name"], arguments


def run_tool_call(text: str, tools: dict[str, Tool] = TOOLS) -> ToolCall:
    """Parse and run one call; every failure becomes an "error: ..." result."""
    try:
        name, arguments = parse_tool_call(text)
    except ToolError as e:
        return ToolCall("", {}, f"error: {e}", raw=text)
    call = ToolCall(name, arguments, raw=text)
    tool = tools.get(name)
    try:
        if tool is None:
            raise ToolError(f"unknown tool {name!r} (available: {', '.join(tools)})")
        result = tool.run(arguments)
    except ToolError as e:
        result = f"error: {e}"
    except ImportError as e:  # the sandbox area is not installed
        result = f"error: tool {name!r} is unavailable ({e})"
    call.result = _truncate(result)
    return call


def _truncate(text: str) -> str:
    if len(text) <= MAX_RESULT_CHARS:
        return text
    return text[:MAX_RESULT_CHARS] + f"\n... ({len(text) - MAX_RESULT_CHARS} more characters)"

"""The OpenAI-compatible server on a real uvicorn on 127.0.0.1, driven by the official `openai` client
(and httpx for the error cases), with a tiny random-weight model, a tiny trained tokenizer and a
LoRA adapter served beside the base. Expected texts come from a separate Engine on the same weights."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from lathe.cli import main as lathe_main
from lathe.serve.engine import Engine, Request
from lathe.serve.server import BackgroundServer, Limits, Served, create_app, load_models

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
MAX_TOKENS = 64  # the server's cap in these tests


def _load_bench():
    """bench/serve_load.py: the load generator and the tiny random-weight run, shared with the benchmark."""
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


serve_load = _load_bench()


def make_adapter(run: Path, folder: Path) -> Path:
    """A LoRA adapter with large random weights, so its greedy text differs from the base's."""
    from lathe.finetune.lora import LoraConfig, adapter_parameters, apply_lora, save_adapter
    from lathe.train.checkpoint import load_model

    peft_model = apply_lora(load_model(run), LoraConfig(rank=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(peft_model).values():
            p.normal_(0, 0.5)
    return save_adapter(peft_model, folder)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    run = serve_load.make_tiny_run(tmp_path_factory.mktemp("serve") / "tiny")
    make_adapter(run, run / "adapters" / "math")
    return run


@pytest.fixture(scope="session")
def reference(run_dir) -> dict[str, Engine]:
    """Engines independent of the server: the base, and the adapter loaded straight with peft."""
    from lathe.finetune.lora import load_adapter
    from lathe.train.checkpoint import load_model

    base = Engine.load(run_dir)
    math = load_adapter(load_model(run_dir), run_dir / "adapters" / "math")
    return {"tiny": base, "math": Engine(math, base.tokenizer)}


@pytest.fixture(scope="session")
def server(run_dir):
    models = load_models(run_dir, {"math": run_dir / "adapters" / "math"}, name="tiny")
    app = create_app(models, api_key=KEY, limits=Limits(max_tokens=MAX_TOKENS, max_request_bytes=20_000))
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def expected(engine: Engine, **request) -> list[str]:
    request.setdefault("temperature", 0)
    [result] = engine.generate([Request(**request)])
    return [c.text for c in result.choices]


FOX = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the fox."}]


def test_chat_completions_whole_and_streamed_match_the_engine(client, reference):
    [want] = expected(reference["tiny"], messages=FOX, max_tokens=12)
    assert len(want) > 3
    r = client.chat.completions.create(model="tiny", messages=FOX, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    prompt_tokens = len(reference["tiny"].prompt_ids(Request(messages=FOX))[0])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_tokens, 12,
                                                                                        prompt_tokens + 12)

    chunks = list(client.chat.completions.create(model="tiny", messages=FOX, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == want and len(pieces) > 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_seeded_samples_and_stop_strings_pass_through(client, reference):
    want = expected(reference["tiny"], messages=FOX, max_tokens=10, temperature=1.0, n=3, seed=5)
    r = client.chat.completions.create(model="tiny", messages=FOX, max_tokens=10, temperature=1.0, n=3, seed=5)
    assert [c.message.content for c in sorted(r.choices, key=lambda c: c.index)] == want
    [full] = expected(reference["tiny"], messages=FOX, max_tokens=20)
    stop = full[5:7]
    r = client.chat.completions.create(model="tiny", messages=FOX, max_tokens=20, temperature=0, stop=stop)
    assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_completions_several_prompts_and_samples_whole_and_streamed(client, reference):
    prompts = ["The quick", "def add(a, b):"]
    want = [expected(reference["tiny"], prompt=p, max_tokens=8)[0] for p in prompts]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=0, n=2)
    texts = {c.index: c.text for c in r.choices}
    assert texts == {0: want[0], 1: want[0], 2: want[1], 3: want[1]}
    assert r.object == "text_completion" and r.usage.completion_tokens == 4 * 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The quick", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == want[0]
    tok = reference["tiny"].tokenizer
    ids = [tok.bos_id] + tok.encode("The quick")
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0).choices[0].text == want[0]
    assert client.completions.create(model="tiny", prompt="The quick", temperature=0).usage.completion_tokens == 16


def test_models_are_listed_and_adapters_are_chosen_by_model_name(client, reference):
    assert [m.id for m in client.models.list()] == ["tiny", "math"]
    assert client.models.retrieve("math").owned_by == "lathe"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    want = {name: expected(engine, messages=FOX, max_tokens=12)[0] for name, engine in reference.items()}
    assert want["tiny"] != want["math"]  # the adapter changes the model
    for name in ["math", "tiny", "math", "tiny"]:  # switching back and forth between requests
        r = client.chat.completions.create(model=name, messages=FOX, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == want[name], name


class Verdict(BaseModel):
    color: Literal["red", "green", "blue"]
    ok: bool
    score: int = Field(ge=0, le=99)


SHAPE = {"type": "object", "additionalProperties": False, "required": ["point", "label"],
         "properties": {"point": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                                  "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50},
                                                 "y": {"enum": [0, 0.5, 1]}}},
                        "label": {"type": "string", "enum": ["alpha", "beta"]}}}


def test_json_schema_response_format_always_parses(client):
    ask = [{"role": "user", "content": "Answer as JSON."}]
    parsed = client.chat.completions.parse(model="tiny", messages=ask, response_format=Verdict, temperature=1.0,
                                           seed=3, max_tokens=48)
    assert isinstance(parsed.choices[0].message.parsed, Verdict)
    r = client.chat.completions.create(model="tiny", messages=ask, temperature=1.0, seed=4, n=6, max_tokens=60,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "shape", "schema": SHAPE}})
    outputs = [c.message.content for c in r.choices]
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SHAPE)
    assert len(set(outputs)) > 1  # sampled, not one forced answer
    # any object: an unbounded grammar, so some samples run out of tokens (a valid, unfinished prefix)
    r = client.chat.completions.create(model="tiny", messages=ask, max_tokens=60, temperature=1.0, seed=1, n=8,
                                       response_format={"type": "json_object"})
    finished = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert finished and all(isinstance(json.loads(text), dict) for text in finished)
    assert all(c.message.content.startswith("{") for c in r.choices)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ask, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "required": 3}}})
    assert e.value.body["param"] == "response_format"


def test_openai_tool_messages_become_lathes_chat_format(client, reference):
    from lathe.chat import render_chat

    sent = [{"role": "developer", "content": "Use tools."},
            {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "6*7?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    lathe = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "What is 6*7?"},
             {"role": "assistant", "content": "", "tool_calls": [{"name": "calculator",
                                                                  "arguments": {"expression": "6*7"}}]},
             {"role": "tool", "content": "42"}]
    r = client.chat.completions.create(model="tiny", messages=sent, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == expected(reference["tiny"], messages=lathe, max_tokens=8)[0]
    assert r.usage.prompt_tokens == len(render_chat(reference["tiny"].tokenizer, lathe, True)[0])
    sent[2]["tool_calls"][0]["function"]["arguments"] = "6*7"
    with pytest.raises(openai.BadRequestError, match="JSON object"):
        client.chat.completions.create(model="tiny", messages=sent, max_tokens=8)


def test_a_tool_call_the_model_leaves_to_the_caller_comes_back_in_openai_shape():
    from openai.types.chat import ChatCompletionChunk, ChatCompletionMessage

    from lathe.serve.engine import Choice, Delta, Result, Usage
    from lathe.serve.server import ChatBody, Reply, chat_message
    from lathe.serve.tools import ToolCall

    choice = Choice(0, "Let me compute.", [], "tool_calls", [ToolCall("calculator", {"expression": "6*7"}, "42"),
                                                              ToolCall("python", {"code": "print(1)"})])
    message = ChatCompletionMessage.model_validate(chat_message(choice))
    [call] = message.tool_calls  # the call the engine already ran is not the caller's to run
    assert call.function.name == "python" and json.loads(call.function.arguments) == {"code": "print(1)"}
    body = ChatBody(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True)
    reply = Reply("chat", "tiny", body, job=None)
    last = Delta(0, 0, finish_reason="tool_calls", result=Result([choice], Usage(3, 5), [0, 1, 2]))
    [chunk] = [ChatCompletionChunk.model_validate(c) for c in reply.delta_chunks(0, last)]
    assert chunk.choices[0].finish_reason == "tool_calls"
    assert chunk.choices[0].delta.tool_calls[0].function.name == "python"


def post(server, path: str, body=None, key: str | None = KEY, content: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=60, trust_env=False)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_bad_requests_get_openai_shaped_4xx_errors(server, client):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert error_of(post(server, "/v1/chat/completions", chat, key=None), 401)["code"] == "invalid_api_key"
    assert error_of(post(server, "/v1/chat/completions", chat, key="wrong"), 401)["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", trust_env=False).status_code == 401
    assert httpx.get(server.url + "/health", trust_env=False).json()["status"] == "ok"  # no key needed
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()

    error = error_of(post(server, "/v1/chat/completions", {**chat, "model": "gpt-4"}), 404)
    assert error["code"] == "model_not_found" and "tiny" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=chat["messages"])

    huge = {**chat, "messages": [{"role": "user", "content": "x" * 30_000}]}
    assert error_of(post(server, "/v1/chat/completions", huge), 413)["code"] == "request_too_large"

    error = error_of(post(server, "/v1/chat/completions", {**chat, "max_tokens": MAX_TOKENS + 1}), 400)
    assert error["param"] == "max_tokens" and f"at most {MAX_TOKENS}" in error["message"]
    with pytest.raises(openai.BadRequestError, match="at most 8"):
        client.chat.completions.create(model="tiny", messages=chat["messages"], n=9)
    for body, param in [({**chat, "temperature": 3}, "temperature"),
                        ({**chat, "frequency_penalty": 0.5}, "frequency_penalty"),
                        ({**chat, "messages": []}, "messages"),
                        ({**chat, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
                        ({**chat, "stop": ["ok", ""]}, "stop"),
                        ({**chat, "response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
                        ({"model": "tiny", "prompt": []}, "prompt")]:
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        assert error_of(post(server, path, body), 400)["param"] == param, body
    assert error_of(post(server, "/v1/chat/completions", content=b"{not json"), 400)["code"] == "invalid_json"
    assert error_of(post(server, "/v1/chat/completions", content=b"[1, 2]"), 400)["code"] == "invalid_json"
    long = {**chat, "messages": [{"role": "user", "content": "the quick brown fox " * 100}]}
    for stream in (False, True):  # the prompt is checked before a stream starts: a plain 400 either way
        error = error_of(post(server, "/v1/chat/completions", {**long, "stream": stream}), 400)
        assert error["code"] == "context_length_exceeded" and "context is 128" in error["message"]
    assert error_of(httpx.get(server.url + "/v1/nothing", trust_env=False), 404)


@dataclass(eq=False)
class Gated(Served):
    """A served model whose batches wait for `gate`: holds the worker so the queue fills up on cue."""

    gate: threading.Event = field(default_factory=threading.Event)

    def activate(self) -> None:
        assert self.gate.wait(60)
        super().activate()


def wait_for(server, predicate, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(server.url + "/health", trust_env=False, timeout=5).json()
        if predicate(health):
            return health
        time.sleep(0.02)
    raise AssertionError(f"/health never satisfied the condition: {health}")


def test_queued_requests_merge_into_one_batch_and_a_full_queue_gets_429(run_dir, reference):
    gated = Gated(Engine.load(run_dir))
    app = create_app({"tiny": gated}, limits=Limits(max_pending=6))
    prompts = [f"Question {i}: where is the fox?" for i in range(6)]
    bodies = [{"model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": 6, "temperature": 0}
              for p in prompts]
    with BackgroundServer(app) as server, ThreadPoolExecutor(6) as pool:
        first = pool.submit(post, server, "/v1/chat/completions", bodies[0], None)
        wait_for(server, lambda h: h["batches"] == 1)  # the worker took it and waits at the gate
        rest = [pool.submit(post, server, "/v1/chat/completions", b, None) for b in bodies[1:]]
        start = time.monotonic()
        wait_for(server, lambda h: h["pending"] == 6)  # /health answers while the engine is held
        assert time.monotonic() - start < 20
        error = error_of(post(server, "/v1/chat/completions", bodies[0], None), 429)
        assert error["type"] == "rate_limit_error" and "limit 6" in error["message"]
        gated.gate.set()
        replies = [f.result().json()["choices"][0]["message"]["content"] for f in [first, *rest]]
        health = wait_for(server, lambda h: h["pending"] == 0)
    assert health["batches"] == 2  # the five queued requests were decoded together
    assert replies == [expected(reference["tiny"], messages=b["messages"], max_tokens=6)[0] for b in bodies]


def test_a_client_leaving_mid_stream_does_not_stall_the_server(server, client):
    body = {"model": "tiny", "messages": FOX, "max_tokens": MAX_TOKENS, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, trust_env=False,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # one chunk, then hang up
    wait_for(server, lambda h: h["pending"] == 0)
    assert client.chat.completions.create(model="tiny", messages=FOX, max_tokens=3).usage.completion_tokens <= 3


def test_bounded_load_20_concurrent_streams_none_fail(server):
    import asyncio

    report = asyncio.run(serve_load.run_load(server.url, "tiny", n=20, max_tokens=8, api_key=KEY, timeout_s=90))
    assert report.failures == [] and len(report.latency_s) == 20
    assert report.health_checks >= 1 and report.health_failures == 0
    assert 0 < serve_load.percentile(report.ttft_s, 50) <= serve_load.percentile(report.latency_s, 99)
    assert report.completion_tokens > 20  # sampled replies: most run the full 8 tokens
    assert "p50" in "\n".join(report.lines())


def test_lathe_serve_command_serves_until_interrupted(run_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LATHE_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "lathe", "serve", "--run", str(run_dir), "--port", "0",
                             "--name", "cli-model"], stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        lines = []
        while not (found := re.search(r"(http://127\.0\.0\.1:\d+)/v1", lines[-1] if lines else "")):
            lines.append(proc.stderr.readline())
            assert lines[-1], f"lathe serve exited early: {''.join(lines)}"
        url = found.group(1)
        r = httpx.post(url + "/v1/chat/completions", trust_env=False, timeout=60,
                       headers={"Authorization": "Bearer from-env"},
                       json={"model": "cli-model", "messages": FOX, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert httpx.get(url + "/", trust_env=False).text.startswith("<!doctype html>")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.stderr.close()


def test_serve_command_bad_input_is_one_line_exit_2(run_dir, tmp_path, capsys):
    assert lathe_main(["serve", "--run", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with BackgroundServer(create_app({"x": Engine.load(run_dir)})) as taken:
        port = taken.url.rsplit(":", 1)[1]
        assert lathe_main(["serve", "--run", str(run_dir), "--port", port]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
    assert lathe_main(["serve", "--run", str(run_dir), "--adapter", "math=" + str(tmp_path)]) == 2
    assert "not an adapter folder" in capsys.readouterr().err

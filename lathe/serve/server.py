"""The OpenAI-compatible HTTP server behind `lathe serve`, and the web chat page.

    app = create_app(load_models("runs/my-run", adapters={"math": "adapters/math"}), api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

    from openai import OpenAI                                   # the official client, unchanged
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model="math", messages=[{"role": "user", "content": "2+2="}])

Endpoints: POST /v1/chat/completions and /v1/completions (with "stream": true the answer comes as
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`), GET /v1/models,
GET /v1/models/{id}, GET /health (no key needed: status, models, requests pending, batches run),
and GET / (the web chat page in static/).

How requests run: the engine decodes one batch at a time, so every request becomes a job in one
queue, served by one worker thread (generation never blocks the event loop: /health answers during
a long batch). When the worker frees up it takes the oldest job plus every queued job for the same
model (up to `Limits.max_batch_rows` samples) and decodes them together as one `Engine.stream_many`
batch; deltas go back to each request's asyncio queue. Adapters share one base model, so the
worker switches the active adapter (`Autopilot.use`) between batches, never within one.

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 bad body or
parameter (including a prompt longer than the context), 401 bad API key, 404 unknown model,
413 body over `max_request_bytes`, 429 more than `max_pending` requests queued or running.
Extensions beyond OpenAI's fields: `top_k` and `repetition_penalty`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from lathe.config import Section
from lathe.console import warn
from lathe.errors import LatheError
from lathe.serve.constrained import Constraint
from lathe.serve.engine import Delta, Engine, Result, as_request

STATIC = Path(__file__).parent / "static"


class Limits(Section):
    max_request_bytes: int = Field(1_000_000, ge=1, description="larger bodies get 413")
    max_tokens: int = Field(1024, ge=1, description="a larger max_tokens gets 400")
    default_max_tokens: int = Field(256, ge=1, description="chat max_tokens when the request gives none")
    max_n: int = Field(8, ge=1, description="samples per prompt")
    max_pending: int = Field(256, ge=1, description="requests queued or running; more get 429")
    max_batch_rows: int = Field(64, ge=1, description="samples decoded together in one batch")


# --- what is served -----------------------------------------------------------------------------
@dataclass
class Served:
    """One model name: an engine, and for an adapter the Autopilot to switch it on."""

    engine: Engine
    pilot: Any = None  # lathe.finetune.autopilot.Autopilot, shared by the base and its adapters
    adapter: str | None = None

    def activate(self) -> None:
        if self.pilot is not None:
            self.pilot.use(self.adapter)


def load_models(run: str | Path, adapters: dict[str, str | Path] | None = None, device: str = "cpu",
                name: str | None = None) -> dict[str, Served]:
    """The run's model under `name` (default: the run folder's name), plus one name per adapter."""
    run = Path(run)
    engine = Engine.load(run, device)
    base = name or run.resolve().name
    if not adapters:
        return {base: Served(engine)}
    from lathe.finetune.autopilot import Autopilot

    pilot = Autopilot(engine.model, engine.tokenizer)  # LoRA branches go into engine.model in place
    for adapter, folder in adapters.items():
        if adapter == base:
            raise LatheError(f"--adapter {adapter}: the base model is already served under that name")
        pilot.add_adapter(adapter, folder)
    return {base: Served(engine, pilot, None), **{a: Served(engine, pilot, a) for a in adapters}}


def as_served(models: dict[str, Engine | Served]) -> dict[str, Served]:
    if not models:
        raise LatheError("create_app: no models to serve")
    return {name: m if isinstance(m, Served) else Served(m) for name, m in models.items()}


# --- errors -------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def validation_error(e: ValidationError) -> ApiError:
    """The first problem of a body, as OpenAI words it: one message naming the parameter."""
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    return ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param, "invalid_value")


def engine_error(e: LatheError) -> ApiError:
    """An error the engine found (prompt too long, bad schema, bad message): 400 with the parameter."""
    message = " ".join(str(e).split())
    if message.startswith("constraint"):
        return ApiError(400, message, "response_format", "invalid_schema")
    if "context is" in message:
        return ApiError(400, message, None, "context_length_exceeded")
    param = message.split(":")[0].split(".", 1)[-1].split("[")[0] if message.startswith("request.") else None
    return ApiError(400, message, param, "invalid_value")


# --- OpenAI request bodies ----------------------------------------------------------------------
class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Body):
    include_usage: bool = False


class JsonSchemaFormat(Body):
    name: str = "response"
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> Constraint | None:
        if self.type == "json_object":
            return Constraint.json_schema({"type": "object"})
        if self.type == "json_schema":
            if self.json_schema is None or not self.json_schema.schema_:
                raise ApiError(400, "response_format.json_schema.schema: required for type json_schema",
                               "response_format.json_schema.schema", "invalid_value")
            return Constraint.json_schema(self.json_schema.schema_)
        return None


class Sampling(Body):
    """Fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("at most 16 stop strings, none empty")
        return stops

    def sampling(self, limits: Limits, default_max_tokens: int, max_tokens: int | None) -> dict:
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                           "max_tokens", "invalid_value")
        if self.n > limits.max_n:
            raise ApiError(400, f"n is {self.n}; this server allows at most {limits.max_n}", "n", "invalid_value")
        return dict(max_tokens=max_tokens or min(default_max_tokens, limits.max_tokens),
                    temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    repetition_penalty=self.repetition_penalty, n=self.n, stop=self.stop or [], seed=self.seed)


class TextPart(Body):
    type: Literal["text"]
    text: str


class FunctionCall(Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    # what the openai client puts in an assistant message it returned: accepted when sent back
    refusal: str | None = None
    annotations: list | None = None
    audio: dict | None = None
    function_call: dict | None = None

    def as_lathe(self, where: str) -> dict:
        """lathe's chat format (lathe.chat): developer -> system, tool-call arguments parsed."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [{"name": c.function.name, "arguments": _json_arguments(c, where)}
                                     for c in self.tool_calls]
        return message


def _json_arguments(call: ToolCallIn, where: str) -> dict:
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ApiError(400, f"{where}.tool_calls: function.arguments must be a JSON object", where, "invalid_value")
    return arguments


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None

    def requests(self, limits: Limits) -> list[dict]:
        messages = [m.as_lathe(f"messages.{i}") for i, m in enumerate(self.messages)]
        constraint = self.response_format.constraint() if self.response_format else None
        sampling = self.sampling(limits, limits.default_max_tokens, self.max_tokens or self.max_completion_tokens)
        return [dict(messages=messages, constraint=constraint, **sampling)]


class CompletionBody(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]

    def requests(self, limits: Limits) -> list[dict]:
        prompts = [self.prompt] if isinstance(self.prompt, str) or _is_ids(self.prompt) else self.prompt
        if not prompts:
            raise ApiError(400, "prompt: must not be empty", "prompt", "invalid_value")
        sampling = self.sampling(limits, 16, self.max_tokens)  # 16: OpenAI's default for completions
        return [dict(prompt=p, **sampling) for p in prompts]


def _is_ids(prompt) -> bool:
    return bool(prompt) and all(isinstance(t, int) for t in prompt)


# --- the job queue and its worker -----------------------------------------------------------------
@dataclass(eq=False)
class Job:
    """One HTTP request: its generation requests, and the asyncio queue its events go back on."""

    model: str
    requests: list  # engine Requests
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    @property
    def rows(self) -> int:
        return sum(r.n for r in self.requests)

    def emit(self, *event) -> None:
        """Called from the worker thread: hand one event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled = True


class Scheduler:
    """One worker thread decodes queued jobs, merging those for the same model into one batch.

    Events per job: ("start",) once its batch has begun, then ("delta", request_index, Delta)...,
    ending with exactly one of ("end",) or ("error", exception). A job the engine rejects (prompt too
    long, bad schema) gets ("error", LatheError) without holding up the others in its batch."""

    def __init__(self, models: dict[str, Served], limits: Limits):
        self.models, self.limits = models, limits
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._pending = 0  # queued + running
        self.batches = 0  # batches decoded so far (fewer than requests when queued ones were merged)
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        with self._cv:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._work, name="lathe-engine", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, model: str, requests: list) -> Job:
        job = Job(model, requests, asyncio.get_running_loop())
        with self._cv:
            if self._pending >= self.limits.max_pending:
                raise ApiError(429, f"the server is busy: {self._pending} requests are queued or running "
                                    f"(limit {self.limits.max_pending}); retry shortly",
                               None, "too_many_requests", "rate_limit_error")
            self._pending += 1
            self._queue.append(job)
            self._cv.notify()
        self.start()
        return job

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                self._run(jobs)
            finally:
                with self._cv:
                    self._pending -= len(jobs)

    def _take(self) -> list[Job] | None:
        """The oldest job, plus queued jobs for the same model while they fit in one batch."""
        with self._cv:
            while not self._queue and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            first = self._queue.popleft()
            jobs, rows = [first], first.rows
            for job in list(self._queue):
                if job.model == first.model and rows + job.rows <= self.limits.max_batch_rows:
                    self._queue.remove(job)
                    jobs.append(job)
                    rows += job.rows
            return jobs

    def _run(self, jobs: list[Job]) -> None:
        served = self.models[jobs[0].model]
        jobs = [job for job in jobs if not job.cancelled and self._admit(served.engine, job)]
        if not jobs:
            return
        owners = [(job, i) for job in jobs for i in range(len(job.requests))]
        self.batches += 1
        try:
            served.activate()
            stream = served.engine.stream_many([r for job in jobs for r in job.requests])
            for job in jobs:
                job.emit("start")
            for delta in stream:
                job, index = owners[delta.request]
                job.emit("delta", index, delta)
                if all(j.cancelled for j in jobs):  # every client went away: free the engine now
                    stream.close()
                    break
        except Exception as e:  # a bug, not bad input (that was caught in _admit): report, keep serving
            warn(f"generation failed: {e}\n{traceback.format_exc()}")
            for job in jobs:
                job.emit("error", e)
            return
        for job in jobs:
            job.emit("end")

    @staticmethod
    def _admit(engine: Engine, job: Job) -> bool:
        """Check a job's prompts and constraints alone, so one bad request cannot fail a whole batch."""
        try:
            for request in job.requests:
                engine.prompt_ids(request)
                if request.constraint is not None:
                    engine.constrainer().matcher(request.constraint)
            return True
        except LatheError as e:
            job.emit("error", e)
            return False


async def next_event(job: Job) -> tuple:
    event = await job.events.get()
    if event[0] == "error":
        e = event[1]
        raise engine_error(e) if isinstance(e, LatheError) else ApiError(
            500, f"generation failed: {e}", None, None, "server_error")
    return event


# --- OpenAI response shapes ---------------------------------------------------------------------
def usage_of(results: list[Result]) -> dict:
    prompt = sum(r.usage.prompt_tokens for r in results)  # once per prompt, however many samples
    completion = sum(r.usage.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def tool_calls_of(choice) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for c in choice.tool_calls if c.result is None]  # calls the engine ran are not the caller's


def chat_message(choice) -> dict:
    message = {"role": "assistant", "content": choice.text, "refusal": None}
    calls = tool_calls_of(choice)
    if calls:
        message["tool_calls"] = calls
    return message


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Reply:
    """Turns one job's events into an OpenAI response (whole) or its stream of chunks."""

    def __init__(self, kind: Literal["chat", "text"], model: str, body: Sampling, job: Job):
        self.kind, self.model, self.body, self.job = kind, model, body, job
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.results: dict[int, Result] = {}

    def choice_index(self, request: int, sample: int) -> int:
        return request * self.body.n + sample  # several prompts (completions): n choices each

    def envelope(self, choices: list[dict], **extra) -> dict:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj + (".chunk" if self.kind == "chat" and self.body.stream else ""),
                "created": self.created, "model": self.model, "system_fingerprint": None,
                "choices": choices, **extra}

    async def whole(self) -> dict:
        while (event := await next_event(self.job))[0] != "end":
            if event[0] == "delta" and event[2].result is not None:
                self.results[event[1]] = event[2].result
        results = [self.results[i] for i in sorted(self.results)]
        choices = []
        for i, result in enumerate(results):
            for c in result.choices:
                choice = {"index": self.choice_index(i, c.index), "logprobs": None, "finish_reason": c.finish_reason}
                if self.kind == "chat":
                    choice["message"] = chat_message(c)
                else:
                    choice["text"] = c.text
                choices.append(choice)
        return self.envelope(choices, usage=usage_of(results))

    async def chunks(self):
        """SSE text: role chunks, one chunk per text delta, a finish chunk per choice, usage, [DONE]."""
        try:
            if self.kind == "chat":
                roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(self.body.n)]
                yield sse(self.envelope(roles))
            while True:
                try:
                    event = await next_event(self.job)
                except ApiError as e:
                    yield sse(e.body())  # headers are sent: the error goes in the stream
                    break
                if event[0] == "end":
                    if self.body.stream_options and self.body.stream_options.include_usage:
                        yield sse(self.envelope([], usage=usage_of(list(self.results.values()))))
                    break
                if event[0] == "delta":
                    for chunk in self.delta_chunks(event[1], event[2]):
                        yield sse(chunk)
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancelled = True  # finished, or the client went away: stop spending the engine on it

    def delta_chunks(self, request: int, delta: Delta) -> list[dict]:
        index = self.choice_index(request, delta.index)
        out = []
        if delta.text:
            content = {"content": delta.text} if self.kind == "chat" else {"text": delta.text}
            out.append(self.piece(index, content, None))
        if delta.result is not None:
            self.results[request] = delta.result
            # a "tool_calls" finish waits for the result, which carries the call
            for c in delta.result.choices:
                if c.finish_reason == "tool_calls":
                    calls = [dict(call, index=k) for k, call in enumerate(tool_calls_of(c))]
                    out.append(self.piece(self.choice_index(request, c.index), {"tool_calls": calls}, "tool_calls"))
        if delta.finish_reason is not None and delta.finish_reason != "tool_calls":
            out.append(self.piece(index, {} if self.kind == "chat" else {"text": ""}, delta.finish_reason))
        return out

    def piece(self, index: int, content: dict, finish: str | None) -> dict:
        choice = {"index": index, "logprobs": None, "finish_reason": finish}
        choice.update({"delta": content} if self.kind == "chat" else content)
        return self.envelope([choice])


# --- the app --------------------------------------------------------------------------------------
def create_app(models: dict[str, Engine | Served], api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    """An app serving `models` by name: Engines, or `Served` entries from `load_models` (adapters)."""
    from contextlib import asynccontextmanager

    models, limits = as_served(models), limits or Limits()
    scheduler = Scheduler(models, limits)

    @asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="lathe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.limits = scheduler, limits
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        return ApiError(e.status_code, str(e.detail), None, None).response()

    def check_key(request: HttpRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer KEY'",
                           None, "invalid_api_key")

    async def parse(request: HttpRequest, schema: type[Sampling]) -> tuple[Sampling, str]:
        check_key(request)
        data = await read_json_body(request, limits.max_request_bytes)
        try:
            body = schema.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        if body.model not in models:
            raise ApiError(404, f"The model '{body.model}' does not exist; this server has: "
                                f"{', '.join(models)}", "model", "model_not_found")
        return body, body.model

    async def complete(request: HttpRequest, schema: type[Sampling], kind: Literal["chat", "text"]):
        body, model = await parse(request, schema)
        try:
            requests = [as_request(r) for r in body.requests(limits)]
        except LatheError as e:
            raise engine_error(e) from None
        job = scheduler.submit(model, requests)
        reply = Reply(kind, model, body, job)
        if not body.stream:
            try:
                return JSONResponse(await reply.whole())
            finally:
                job.cancelled = True
        try:
            await next_event(job)  # ("start",): bad prompts are still a plain 400, not a broken stream
        except ApiError:
            job.cancelled = True
            raise
        return StreamingResponse(reply.chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await complete(request, ChatBody, "chat")

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await complete(request, CompletionBody, "text")

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "lathe"}

    @app.get("/v1/models")
    async def list_models(request: HttpRequest):
        check_key(request)
        return {"object": "list", "data": [model_card(name) for name in models]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: HttpRequest):
        check_key(request)
        if name not in models:
            raise ApiError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return model_card(name)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models), "pending": scheduler.pending, "batches": scheduler.batches}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def read_json_body(request: HttpRequest, limit: int) -> dict:
    """The body as a JSON object, read no further than `limit` bytes (413 past it)."""
    too_large = ApiError(413, f"request body is larger than this server's limit of {limit} bytes",
                         None, "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", None, "invalid_json")
    return data


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0 = a free port), for uvicorn's `Server.run(sockets=...)`."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    except OSError as e:
        sock.close()
        raise LatheError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def uvicorn_server(app):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))


class BackgroundServer:
    """uvicorn serving `app` from a daemon thread (tests, benchmarks, notebooks):

        with BackgroundServer(app) as server:      # a free port on 127.0.0.1
            httpx.get(server.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.sock = listen(host, port)  # bound here, so the port is known before the thread starts
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn_server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

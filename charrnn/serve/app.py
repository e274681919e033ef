"""`charrnn serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    POST /v1/completions     OpenAI's completions (prompt, max_tokens = characters, n, stop,
                             temperature, top_p, seed, stream, echo, logprobs)
    GET  /v1/models[/{name}] what is loaded; one model's config, vocabulary and training summary
    POST /v1/score           text -> loss, bpc, perplexity (as `charrnn eval`), optional surprisal
    GET  /health, /metrics   liveness and streams; Prometheus' text format
    GET  /                   the playground page

Each model has one Engine (charrnn.serve.engine), and one thread (engine.Runner) steps them
all; a request's sequences are its prompts, and the engine hands their characters back
through `Bridge`, which wakes the event loop at a bounded rate however many streams got
characters. A stream's client takes everything that has arrived since it last woke.

Safe by default: 127.0.0.1 unless --host says otherwise, a bearer token when --api-key
(or CHARRNN_API_KEY) is set, caps on prompt, max_tokens, n, body size and streams (503 with
Retry-After past them), models only the ones given at start. Errors are OpenAI's JSON
shape, {"error": {"message", "type", "param", "code"}}, and never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import re
import secrets
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, ClassVar, Literal, Optional, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from charrnn.serve.chat import ChatTemplate, Message
from charrnn.config import EVAL_STREAMS, MAX_SEED
from charrnn.serve.engine import Busy, Engine, Meter, Request, Runner, Sequence
from charrnn.errors import CharRNNError, TextError, UsageError, check_text
from charrnn.infer.evaluate import EvalResult
from charrnn.store.rundir import records
from charrnn.infer.sample import parse_logit_bias
from charrnn.version import __version__


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much the server takes on at once."""

    max_streams: int = 64  # rows decoded together per model; past them requests queue
    max_queued: int = 64  # streams waiting for a row per model; past them 503 + Retry-After
    max_prompt: int = 4096  # characters in a prompt (each prompt of a list)
    max_tokens: int = 4096  # new characters per choice
    max_n: int = 16  # choices per prompt
    max_prompts: int = 16  # prompts in one request's list
    max_score: int = 1_000_000  # characters /v1/score reads (100,000 with surprisal)
    max_body: int = 4 * 1024 * 1024  # bytes of a request body
    unknown: str = "error"  # characters a model does not know: error (a 400 naming them) or skip


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), self.status, self.headers)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- request bodies: pydantic checks types and fixed ranges; Limits the configurable ones --------


class _Body(BaseModel):
    """A request body whose every string (in lists and as keys too) is valid Unicode: JSON
    can carry a lone surrogate ("\\ud800"), which nothing downstream could encode. Refused
    here, 400 naming the field (prompt[1] for the second prompt)."""

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any, info: ValidationInfo) -> Any:
        def walk(item: Any, name: str) -> None:
            if isinstance(item, str):
                check_text(item, name)
            elif isinstance(item, list):
                for k, x in enumerate(item):
                    walk(x, f"{name}[{k}]")
            elif isinstance(item, dict):
                for key, x in item.items():
                    walk(key, f"{name} key")
                    walk(x, f"{name}[{key!r}]")

        walk(value, info.field_name)
        return value


class _Drawing(_Body):
    """What a completion and a chat completion share: the model, the sampling controls,
    choices, stop strings, the seed and streaming."""

    model_config = ConfigDict(strict=True, extra="ignore")  # unknown OpenAI fields (user, ...) are ignored

    model: Optional[str] = None  # may be left out when one model is served
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0 = off; with min_p, not OpenAI's (send them with the client's extra_body)
    min_p: float = Field(0.0, ge=0, le=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None  # a character (or its id, as a string of digits) -> -100 to 100
    n: int = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: Optional[dict[str, bool]] = None


class CompletionBody(_Drawing):
    prompt: Union[str, list[str]]
    max_tokens: int = Field(256, ge=0)  # characters (OpenAI's default of 16 tokens is ~64 characters)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)


class ChatMessageBody(_Body):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict[str, Any]]]  # a string, or OpenAI's parts: [{"type": "text", "text": ...}]
    name: Optional[str] = None


class ChatBody(_Drawing):
    messages: list[ChatMessageBody]
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)  # the newer name; either, 256 if neither
    logprobs: bool = False  # each character's log-probability, in OpenAI's chat shape
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)  # and the k likeliest alternatives

    echo: ClassVar[bool] = False  # what _Reply asks of a completion body


class ScoreBody(_Body):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: Optional[str] = None
    text: str
    streams: int = Field(EVAL_STREAMS, ge=1, le=4096)
    surprisal: bool = False  # also each character's surprisal, in bits
    unknown: Optional[Literal["error", "skip"]] = None  # default: the server's --unknown


# -- the bridge from the engines' threads to the event loop ------------------------------------------


class Bridge:
    """Wakes each sequence's waiter (an asyncio.Event) on the loop: at once for a sequence's
    first characters (the time to first character) and its end, else at most every
    `interval` seconds (10 ms: a hundred updates a second read as a smooth stream), and
    less often with many streams, keeping to about `wakes_per_second` wakes in all. Each
    wake costs the event loop a chunk's JSON and a write (~100 us of Python holding the
    GIL the decoding loop needs), so its work grows with the clients, never with the
    decoding steps: at 64 streams, a chunk every ~64 ms of ~20 characters each."""

    def __init__(self, interval: float = 0.01, wakes_per_second: float = 1000):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.interval, self.wakes_per_second = interval, wakes_per_second
        self._pending: set[Sequence] = set()
        self._lock = threading.Lock()
        self._scheduled = False
        self._last = 0.0

    def notify(self, sequences: list[Sequence]) -> None:
        if not sequences or self.loop is None:
            return
        urgent = any(not getattr(s, "woken", False) or s.finished for s in sequences)
        with self._lock:
            self._pending.update(sequences)
            if self._scheduled:
                return
            self._scheduled = True
            waiting = len(self._pending)
        interval = max(self.interval, waiting / self.wakes_per_second)
        delay = 0.0 if urgent else max(0.0, self._last + interval - time.monotonic())
        self.loop.call_soon_threadsafe(self._schedule, delay)

    def _schedule(self, delay: float) -> None:
        if delay > 0:
            self.loop.call_later(delay, self._flush)
        else:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, set(), False
        self._last = time.monotonic()
        for sequence in pending:
            sequence.woken = True
            sequence.waker.set()


# -- metrics ----------------------------------------------------------------------------------


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("charrnn_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.chars = Counter("charrnn_generated_characters", "Characters generated", ["model"], registry=r)
        self.active = Gauge("charrnn_active_streams", "Streams being decoded", ["model"], registry=r)
        self.queued = Gauge("charrnn_queued_streams", "Streams waiting for a row", ["model"], registry=r)
        self.first = Histogram("charrnn_time_to_first_character_seconds", "From a request's arrival to its first character",
                               ["model"], registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.primes = Counter("charrnn_prompts", "Prompts a request brought: read now, or their state kept from "
                              "an earlier read", ["model", "source"], registry=r)
        self.step = Histogram("charrnn_decode_step_seconds", "One decoding step of every active stream",
                              ["model"], registry=r, buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25))

    def meter(self, name: str, engine_of: Callable[[], Engine]) -> Meter:
        metrics = self
        self.active.labels(name).set_function(lambda: engine_of().active_streams)
        self.queued.labels(name).set_function(lambda: engine_of().queued_streams)

        class _Meter(Meter):
            def step(self, seconds: float, rows: int) -> None:
                metrics.step.labels(name).observe(seconds)

            def first_char(self, seconds: float) -> None:
                metrics.first.labels(name).observe(seconds)

            def chars(self, count: int) -> None:
                if count:
                    metrics.chars.labels(name).inc(count)

            def primes(self, read: int, cached: int) -> None:
                metrics.primes.labels(name, "read").inc(read)
                metrics.primes.labels(name, "cached").inc(cached)

        return _Meter()


# -- the app ------------------------------------------------------------------------------------


class Served:
    """One model as served: its name, the api.Model, its engine."""

    def __init__(self, name: str, model, limits: Limits, bridge: Bridge, metrics: Metrics, threads: int | None):
        self.name, self.model = name, model
        self.engine = Engine(model, limits.max_streams, limits.max_queued, bridge.notify,
                             metrics.meter(name, lambda: self.engine), threads)
        self.created = int(model.path.stat().st_mtime) if model.path.exists() else int(time.time())

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "charrnn"}

    def details(self) -> dict:
        model, config = self.model, self.model.model_config
        parameters = sum(p.numel() for p in model.network.parameters())
        training: dict[str, Any] = {"step": model.step, "corpus": model.corpus.get("name"),
                                    "corpus_chars": model.corpus.get("chars")}
        if model.run_dir is not None:
            found = [r for _, r in records(model.run_dir / "metrics.jsonl", strict=False)]
            losses = [r["val_loss"] for r in found if isinstance(r.get("val_loss"), (int, float))]
            if losses:
                training["best_val_loss"] = min(losses)
                training["best_val_bpc"] = min(losses) / math.log(2)
            if found:
                training["last_record"] = found[-1]
        return {**self.card(), "charrnn": {
            "config": {**config.__dict__}, "parameters": parameters, "vocabulary": model.vocab.chars,
            "vocabulary_size": len(model.vocab), "start_mix": model.prior is not None, "training": training,
            "file": str(model.path), "version": __version__}}


def create_app(models: dict[str, Any], limits: Limits = Limits(), api_key: str | None = None,
               log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
               threads: int | None = None, chat: ChatTemplate = ChatTemplate()) -> FastAPI:
    """The server for models ({name: charrnn.infer.api.Model}); their engines, stepped by one
    decoding thread (engine.Runner) with `threads` intra-op threads (default: torch's
    count now), start with the app. chat: how /v1/chat/completions writes messages as
    text (charrnn.serve.chat)."""
    bridge, metrics = Bridge(), Metrics()
    served = {name: Served(name, model, limits, bridge, metrics, threads) for name, model in models.items()}
    runner = Runner([s.engine for s in served.values()])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        bridge.loop = asyncio.get_running_loop()
        runner.start()
        yield
        close_all()

    def close_all() -> None:
        runner.close()

    app = FastAPI(title="charrnn", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")  # the routes' schema, for clients and schemathesis
    app.state.served, app.state.close_all, app.state.metrics = served, close_all, metrics

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        return _validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        return JSONResponse(error_body(f"{err.detail}: {request.method} {request.url.path}", code=str(err.status_code)),
                            err.status_code)

    @app.exception_handler(Exception)
    async def crashed(request, err: Exception):  # a bug: say so in one line, never a traceback
        log(f"error: {type(err).__name__}: {err} ({request.method} {request.url.path})")
        return JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error"), 500)

    def pick(name: str | None) -> Served:
        if name is None:
            if len(served) == 1:
                return next(iter(served.values()))
            raise APIError(400, f"model is required: this server has {', '.join(served)}", "model")
        if name not in served:
            raise APIError(404, f"model {name!r} is not served here; models: {', '.join(served)}", "model",
                           "model_not_found")
        return served[name]

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(resources.files("charrnn.serve").joinpath("playground.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": {name: {"active_streams": s.engine.active_streams,
                                                  "queued_streams": s.engine.queued_streams,
                                                  "row_kernel": s.engine.row_kernel}
                                           for name, s in served.items()}}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [s.card() for s in served.values()]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str):
        return pick(name).details()

    @app.post("/v1/score")
    async def score(body: ScoreBody, request: HTTPRequest):
        target = pick(body.model)
        cap = limits.max_score // 10 if body.surprisal else limits.max_score
        if not 2 <= len(body.text) <= cap:
            raise APIError(400, f"text must be 2 to {cap:,} characters{' with surprisal' if body.surprisal else ''}, "
                                f"not {len(body.text):,}", "text")
        unknown = body.unknown or limits.unknown
        result = await run_in_threadpool(_score, target.model, body.text, unknown, body.streams, body.surprisal)
        request.scope.setdefault("state", {})["chars"] = len(body.text)
        return {"model": target.name, **result}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HTTPRequest):
        target = pick(body.model)
        prompts = _check_completion(body, target, limits)
        stop, seed = _drawing(body, limits)
        ids = [_encode(target.model, prompt, limits.unknown, f"prompt[{k}]" if isinstance(body.prompt, list) else "prompt")
               for k, prompt in enumerate(prompts)]
        waker = asyncio.Event()
        requests = [Request(prompt_ids=i, length=body.max_tokens, n=body.n, stop=stop, seed=seed, logprobs=body.logprobs,
                            **_controls(body, target.model)) for i in ids]
        sequences = _submit(target, requests, waker)
        reply = _Reply(target, body, prompts, sequences, seed, waker, request.scope.setdefault("state", {}))
        if body.echo and body.logprobs is not None:
            reply.echo_logprobs = await run_in_threadpool(_prompt_logprobs, target.model, prompts, body.logprobs)
        if body.stream:
            return EventStream(reply)
        return await reply.whole()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: HTTPRequest):
        target = pick(body.model)
        length = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        length = 256 if length is None else length
        rendered = _render_chat(body, chat, limits)
        if length > limits.max_tokens:
            field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            raise APIError(400, f"{field} must be 0 to {limits.max_tokens} characters (--max-tokens), not {length}", field)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        stops, seed = _drawing(body, limits)
        stop = ((chat.end,) if chat.end else ()) + stops  # the end of a turn ends the reply
        ids = _encode(target.model, rendered, limits.unknown, "messages")
        waker = asyncio.Event()
        sequences = _submit(target, [Request(prompt_ids=ids, length=length, n=body.n, stop=stop, seed=seed,
                                             logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                             **_controls(body, target.model))], waker)
        reply = _ChatReply(target, body, [rendered], sequences, seed, waker, request.scope.setdefault("state", {}),
                           rendered=rendered)
        if body.stream:
            return EventStream(reply)
        return await reply.whole()

    app.add_middleware(_Gate, limits=limits, api_key=api_key, metrics=metrics, log=log)
    return app


def _submit(target: Served, requests: list[Request], waker: asyncio.Event) -> list[Sequence]:
    """Each request to the model's engine; a 503 (and none of them kept) when it is full."""
    sequences = []
    try:
        for r in requests:
            sequences.append(target.engine.submit(r, waker))
    except Busy as err:
        for s in sequences:
            target.engine.cancel(s)
        raise APIError(503, f"server busy: {err}; retry shortly", code="overloaded", kind="server_error",
                       headers={"Retry-After": "1"}) from None
    return sequences


def _drawing(body: _Drawing, limits: Limits) -> tuple[tuple[str, ...], int]:
    """What both routes check of a _Drawing body (choices within the limits, stop strings),
    and its stop strings and seed (drawn here when the body has none)."""
    if body.n > min(limits.max_n, limits.max_streams):
        raise APIError(400, f"n must be 1 to {min(limits.max_n, limits.max_streams)}, not {body.n}", "n")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > 4 or any(not 1 <= len(s) <= 64 for s in stops):
        raise APIError(400, "stop: at most 4 strings, each 1 to 64 characters", "stop")
    return tuple(stops), body.seed if body.seed is not None else secrets.randbelow(2**31)


def _render_chat(body: ChatBody, chat: ChatTemplate, limits: Limits) -> str:
    """The messages through the template: the prompt the reply continues."""
    if not body.messages:
        raise APIError(400, "messages: the list is empty; give at least one message", "messages")
    messages = []
    for k, m in enumerate(body.messages):
        if isinstance(m.content, str):
            content = m.content
        else:
            texts = [part.get("text") for part in m.content if part.get("type") == "text"]
            if len(texts) != len(m.content) or not all(isinstance(t, str) for t in texts):
                raise APIError(400, f"messages[{k}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                               "are read by a character model", "messages")
            content = "".join(texts)
            check_text(content, f"messages[{k}].content")
        messages.append(Message(m.role, content, m.name))
    rendered = chat.render(messages)
    if len(rendered) > limits.max_prompt:
        raise APIError(400, f"messages: the conversation is {len(rendered):,} characters as the model reads it; "
                       f"the limit is {limits.max_prompt:,} (--max-prompt)", "messages")
    return rendered


_TYPES = {"prompt": "a string or a list of strings", "stop": "a string, a list of strings or null"}


def _validation_error(err: RequestValidationError) -> APIError:
    """pydantic's first complaint as one line naming the field and what it must be."""
    first = err.errors()[0]
    where = [str(x) for x in first.get("loc", ()) if x != "body"]
    kind = first.get("type", "")
    if isinstance(first.get("ctx", {}).get("error"), TextError):  # its message names the field
        return APIError(400, str(first["ctx"]["error"]), where[0] if where else None)
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})")
    if not where:
        hint = " (send it with Content-Type: application/json)" if isinstance(first.get("input"), bytes) else ""
        return APIError(400, f"the request body must be a JSON object{hint}")
    field = where[0]
    if kind == "missing":
        message = "is required"
    elif field in _TYPES and (len(where) > 1 or kind.endswith("_type")):
        message = f"must be {_TYPES[field]}"
    elif kind == "extra_forbidden":
        message = "is not a field of this request"
    else:
        message = first.get("msg", "is invalid")
    return APIError(400, f"{field}: {message}", field)


def _check_completion(body: CompletionBody, target: Served, limits: Limits) -> list[str]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise APIError(400, "prompt: the list is empty; give at least one prompt", "prompt")
    if len(prompts) > limits.max_prompts:
        raise APIError(400, f"prompt: at most {limits.max_prompts} prompts in one request, not {len(prompts)}", "prompt")
    for k, prompt in enumerate(prompts):
        name = f"prompt[{k}]" if isinstance(body.prompt, list) else "prompt"
        if not prompt:
            raise APIError(400, f"{name} is empty; give at least one character (a newline starts a fresh text)", "prompt")
        if len(prompt) > limits.max_prompt:
            raise APIError(400, f"{name} has {len(prompt):,} characters; the limit is {limits.max_prompt:,} (--max-prompt)",
                           "prompt")
    if body.max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens must be 0 to {limits.max_tokens} characters (--max-tokens), not {body.max_tokens}",
                       "max_tokens")
    if body.echo and body.stream and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is not available when streaming", "echo")
    return prompts


def _controls(body, model) -> dict[str, Any]:
    """The sampling controls of a completion or chat body, as engine.Request's fields."""
    try:
        bias = parse_logit_bias(model.vocab, body.logit_bias or {}, "logit_bias")
    except UsageError as err:
        raise APIError(400, str(err), "logit_bias") from None
    return dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty, logit_bias=bias)


def _encode(model, prompt: str, unknown: str, field: str):
    try:
        ids, _ = model.vocab.encode(prompt, unknown)
    except CharRNNError as err:
        raise APIError(400, f"{field}: {str(err).replace('use --unknown skip', 'or start the server with --unknown skip')}",
                       "prompt", "unknown_characters") from None
    if len(ids) == 0:
        raise APIError(400, f"{field}: none of its characters is known to the model", "prompt", "unknown_characters")
    return ids


def _score(model, text: str, unknown: str, streams: int, surprisal: bool) -> dict:
    try:
        result = model.score(text, unknown=unknown, streams=streams)
        out = {**result.as_dict(), "streams": streams}
        if surprisal:
            ids, log_probs = model.log_probs(text, unknown)
            nats = -log_probs.gather(1, ids[1:, None])[:, 0].double()
            bits = (nats / math.log(2)).tolist()
            out["surprisal"] = {"unit": "bits", "chars": model.vocab.decode(ids), "values": [None, *bits]}
            if streams == 1:  # one read gives both: the figures are the trace's mean, whatever the dtype
                read_once = EvalResult(len(bits), float(nats.mean()), result.dropped)
                out.update(read_once.as_dict())
        return out
    except CharRNNError as err:
        hint = str(err).replace("use --unknown skip", 'give "unknown": "skip"')
        raise APIError(400, f"text: {hint}", "text") from None


def _prompt_logprobs(model, prompts: list[str], k: int) -> list[dict]:
    out = []
    for prompt in prompts:
        ids, log_probs = model.log_probs(prompt, "skip")
        chars = model.vocab.decode(ids)
        drawn = [None, *log_probs.gather(1, ids[1:, None])[:, 0].tolist()]
        top = [None]
        if len(chars) > 1:
            values, indices = log_probs.topk(min(k, log_probs.shape[1]), dim=1)
            top += [{model.vocab.chars[i]: v for i, v in zip(row_i, row_v)} for row_i, row_v in
                    zip(indices.tolist(), values.tolist())]
        out.append({"tokens": list(chars), "token_logprobs": drawn, "top_logprobs": top})
    return out


class _Reply:
    """One completion request's sequences, read out as a whole response or as events."""

    def __init__(self, target: Served, body: CompletionBody, prompts: list[str], sequences: list[Sequence], seed: int,
                 waker: asyncio.Event, state: dict):
        self.target, self.body, self.prompts, self.sequences = target, body, prompts, sequences
        self.seed, self.waker, self.state = seed, waker, state
        self.id = "cmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.echo_logprobs: list[dict] | None = None
        self.error: str | None = None
        self.ended: set[int] = set()  # the sequences whose ("end",) event has been taken
        self.state["chars"] = 0
        self.extra: dict = {}  # more top-level fields for the response (and the first event)

    OBJECT = CHUNK = "text_completion"

    def _head(self, chunk: bool = False) -> dict:
        return {"id": self.id, "object": self.CHUNK if chunk else self.OBJECT, "created": self.created,
                "model": self.target.name, "system_fingerprint": f"charrnn-{__version__}"}

    def _choice(self, index: int, text: str, logprobs: list, finish: str) -> dict:
        """One choice of the whole response."""
        prompt = self.prompts[index // self.body.n]
        return {"index": index, "text": (prompt + text) if self.body.echo else text,
                "logprobs": self._logprobs(logprobs, index, 0, self.body.echo), "finish_reason": finish}

    def _delta(self, index: int, text: str, logprobs: list, finish: str | None, start: int) -> dict:
        """One choice of one event: what arrived since the last."""
        if self.body.echo and start == 0:
            text = self.prompts[index // self.body.n] + text
        return {"index": index, "text": text, "logprobs": self._logprobs(logprobs, index, start, False),
                "finish_reason": finish}

    def _usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts) * self.body.n
        completion = sum(c.chars for s in self.sequences for c in s.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def take(self) -> tuple[dict[int, list], bool]:
        """Everything that has arrived: {choice index: [text, logprobs, finish]} and whether all ended."""
        found: dict[int, list] = {}
        n = self.body.n
        for p, sequence in enumerate(self.sequences):
            while sequence.events:
                event = sequence.events.popleft()
                if event[0] == "error":
                    self.error = event[1]
                    continue
                if event[0] == "end":  # the last event: by it, not by sequence.finished, which the
                    self.ended.add(p)  # engine's thread may set while events are still on their way
                    continue
                slot = found.setdefault(p * n + event[1], ["", [], None])
                if event[0] == "text":
                    slot[0] += event[2]
                    slot[1] += event[3] or []
                    self.state["chars"] += len(event[2])
                else:
                    slot[2] = event[2]
        return found, len(self.ended) == len(self.sequences)

    async def whole(self) -> JSONResponse:
        texts: dict[int, list] = {}
        while True:
            found, ended = self.take()
            for index, (text, logprobs, finish) in found.items():
                slot = texts.setdefault(index, ["", [], None])
                slot[0] += text
                slot[1] += logprobs
                slot[2] = finish or slot[2]
            if ended:
                break
            await self.waker.wait()
            self.waker.clear()
        if self.error:
            raise APIError(503, self.error, kind="server_error", code="shutting_down")
        choices = []
        for index in range(len(self.sequences) * self.body.n):
            text, logprobs, finish = texts.get(index, ["", [], "length"])
            choices.append(self._choice(index, text, logprobs, finish or "length"))
        return JSONResponse({**self._head(), "choices": choices, "usage": self._usage(), "seed": self.seed, **self.extra})

    def _logprobs(self, entries: list, index: int, offset: int, echoed: bool) -> dict | None:
        """OpenAI's legacy logprobs object for entries (the prompt's first when echoed): each
        character, its log-probability, the likeliest alternatives, its offset in the text."""
        if self.body.logprobs is None:
            return None
        tokens, drawn, top = [], [], []
        if echoed and self.echo_logprobs is not None:
            prompt = self.echo_logprobs[index // self.body.n]
            tokens, drawn, top = list(prompt["tokens"]), list(prompt["token_logprobs"]), list(prompt["top_logprobs"])
        for char, lp, alternatives in entries:
            tokens.append(char)
            drawn.append(lp)
            top.append(alternatives)
        offsets = list(range(offset, offset + len(tokens)))  # one character each
        return {"tokens": tokens, "token_logprobs": drawn, "top_logprobs": top, "text_offset": offsets}

    async def events(self, gone: Callable[[], bool]):
        """Server-sent events in OpenAI's format, ending with data: [DONE]."""
        offsets: dict[int, int] = {}
        include_usage = bool((self.body.stream_options or {}).get("include_usage"))
        while not gone():
            found, ended = self.take()
            for index, (text, logprobs, finish) in sorted(found.items()):
                start = offsets.get(index, 0)
                choice = self._delta(index, text, logprobs, finish, start)
                offsets[index] = start + len(choice.get("text", text))
                extra = self.extra if start == 0 and index == 0 else {}
                yield f"data: {json.dumps({**self._head(chunk=True), 'choices': [choice], **extra})}\n\n"
            if self.error:
                yield f"data: {json.dumps(error_body(self.error, 'server_error', code='shutting_down'))}\n\n"
                break
            if ended:
                if include_usage:
                    yield f"data: {json.dumps({**self._head(chunk=True), 'choices': [], 'usage': self._usage()})}\n\n"
                break
            await self.waker.wait()
            self.waker.clear()
        yield "data: [DONE]\n\n"

    def cancel(self) -> None:
        for sequence in self.sequences:
            self.target.engine.cancel(sequence)


class _ChatReply(_Reply):
    """A chat completion's one sequence, as OpenAI's chat.completion (whole) or
    chat.completion.chunk events: the first delta of a choice carries the role."""

    OBJECT, CHUNK = "chat.completion", "chat.completion.chunk"

    def __init__(self, *args, rendered: str):
        super().__init__(*args)
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.extra = {"prompt": rendered}  # the conversation as the model read it (not OpenAI's; clients ignore it)

    def _choice(self, index: int, text: str, logprobs: list, finish: str) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": self._chat_logprobs(logprobs), "finish_reason": finish}

    def _delta(self, index: int, text: str, logprobs: list, finish: str | None, start: int) -> dict:
        delta = {"role": "assistant", "content": text} if start == 0 else {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": self._chat_logprobs(logprobs), "finish_reason": finish}

    def _chat_logprobs(self, entries: list) -> dict | None:
        """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
        if not self.body.logprobs:
            return None

        def token(char: str, logprob: float) -> dict:
            return {"token": char, "logprob": logprob, "bytes": list(char.encode("utf-8"))}

        return {"content": [{**token(char, lp), "top_logprobs": [token(c, v) for c, v in alternatives.items()]}
                            for char, lp, alternatives in entries]}


class EventStream(Response):
    """A text/event-stream response that notices at once when its client goes away (it
    watches for http.disconnect while it waits) and then frees the request's rows."""

    def __init__(self, reply: _Reply):  # noqa: the body is written as it is drawn, not given here
        self.reply, self.status_code, self.background = reply, 200, None

    async def __call__(self, scope, receive, send) -> None:
        reply, gone = self.reply, False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            reply.cancel()
            reply.waker.set()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            async for chunk in reply.events(lambda: gone):
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-write
            pass
        finally:
            watcher.cancel()
            reply.cancel()


class _Gate:
    """Pure ASGI middleware: the body-size cap, the API key, one log line and a count per request."""

    OPEN = ("/", "/health")  # no key needed: the page asks for one, and a load balancer's probe

    def __init__(self, app, limits: Limits, api_key: str | None, metrics: Metrics, log: Callable[[str], None]):
        self.app, self.limits, self.api_key, self.metrics, self.log = app, limits, api_key, metrics, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path, status = scope["path"], [0]
        state = scope.setdefault("state", {})

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None:
                receive, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                await refusal.response()(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except Exception as err:  # noqa: BLE001 -- Starlette re-raises what its handler has answered, for
            # the server to print a traceback; the handler logged it in one line, and that is enough
            if not status[0]:
                self.log(f"error: {type(err).__name__}: {err} ({scope['method']} {path})")
                await JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error"), 500)(
                    scope, receive, sending)
        finally:
            known = path if path in ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
                                     "/v1/score", "/openapi.json") \
                or path.startswith("/v1/models/") else "other"
            self.metrics.requests.labels("/v1/models/{name}" if known.startswith("/v1/models/") else known,
                                         str(status[0])).inc()
            chars = state.get("chars")
            self.log(f"{scope['method']} {path} {status[0]}"
                     f"{'' if chars is None else f' {chars} chars'} {time.perf_counter() - started:.3f} s")

    def _refusal(self, scope) -> APIError | None:
        if self.api_key is None or scope["path"] in self.OPEN:
            return None
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            return APIError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key")
        return None

    async def _read_body(self, scope, receive):
        """Read the whole body (up to max_body) and hand it on; a bigger one gets a 413."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive, None
        cap = self.limits.max_body
        length = dict(scope["headers"]).get(b"content-length")
        too_big = APIError(413, f"the request body is over {cap:,} bytes", code="body_too_large")
        if length is not None and length.isdigit() and int(length) > cap:
            return receive, too_big
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive, APIError(400, "the client went away while sending")
            body += message.get("body", b"")
            if len(body) > cap:
                return receive, too_big
            if not message.get("more_body"):
                break
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return replay, None


def model_names(paths: list[str]) -> dict[str, str]:
    """{name: path} for `charrnn serve`'s arguments: NAME=PATH, or PATH named for its run
    directory (a .pt outside one: its file name without .pt)."""
    from pathlib import Path

    from charrnn.errors import UsageError
    from charrnn.store.rundir import is_run

    named: dict[str, str] = {}
    for given in paths:
        name, _, path = given.rpartition("=") if "=" in given else ("", "", given)
        if not name:
            p = Path(path)
            name = p.name if p.is_dir() else (p.parent.name if is_run(p.parent) else p.stem)
        if not re.fullmatch(r"[\w.\-]+", name):
            raise UsageError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (NAME=PATH names one)")
        if name in named:
            raise UsageError(f"two models are named {name!r}; name them with NAME=PATH")
        named[name] = path
    return named


class _Server:
    """uvicorn's server, which on SIGTERM / Ctrl-C first ends every open stream with a final
    event (the engines' close) so that shutting down never waits on a long generation."""

    def __init__(self, app: FastAPI, host: str, port: int, on_ready: Callable[[str], None]):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                app.state.close_all()
                super().handle_exit(sig, frame)

            @contextlib.contextmanager
            def capture_signals(self):
                # uvicorn re-raises the signal after its shutdown; a stop asked for is a clean exit (0)
                with super().capture_signals():
                    yield
                    getattr(self, "_captured_signals", []).clear()

            async def startup(self, sockets=None):
                await super().startup(sockets)
                if self.servers and self.servers[0].sockets:
                    bound = self.servers[0].sockets[0].getsockname()
                    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
                    on_ready(f"http://{shown}:{bound[1]}")

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5, lifespan="on")
        self.server = Server(config)

    def run(self) -> None:
        self.server.run()


def serve(models: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          api_key: str | None = None, on_ready: Callable[[str], None] = lambda url: None,
          log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
          threads: int | None = None, chat: ChatTemplate = ChatTemplate()) -> None:
    """Serve models until SIGTERM or Ctrl-C; on_ready(url) once it listens. The decoding
    thread uses `threads` intra-op threads; every other thread should use one (see
    engine.Runner: the `charrnn serve` command sets that before it loads a model)."""
    _Server(create_app(models, limits, api_key, log, threads, chat), host, port, on_ready).run()

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
import math
import sys
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Callable

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from charrnn.errors import CharRNNError, UsageError
from charrnn.infer.evaluate import EvalResult
from charrnn.infer.sample import parse_logit_bias
from charrnn.serve.bridge import Bridge
from charrnn.serve.chat import ChatTemplate
from charrnn.serve.gate import Gate
from charrnn.serve.metrics import Metrics
from charrnn.serve.runner import Runner
from charrnn.serve.schemas import (
    APIError,
    ChatBody,
    CompletionBody,
    Limits,
    ScoreBody,
    drawing,
    error_body,
    render_chat,
    validation_error,
)
from charrnn.serve.sequence import Busy, Request, Sequence
from charrnn.serve.served import Served, check_completion
from charrnn.serve.stream import ChatReply, EventStream, Reply
from charrnn.version import __version__


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
        return validation_error(err).response()

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
        prompts = check_completion(body, target, limits)
        stop, seed = drawing(body, limits)
        ids = [_encode(target.model, prompt, limits.unknown, f"prompt[{k}]" if isinstance(body.prompt, list) else "prompt")
               for k, prompt in enumerate(prompts)]
        waker = asyncio.Event()
        requests = [Request(prompt_ids=i, length=body.max_tokens, n=body.n, stop=stop, seed=seed, logprobs=body.logprobs,
                            **_controls(body, target.model)) for i in ids]
        sequences = _submit(target, requests, waker)
        reply = Reply(target, body, prompts, sequences, seed, waker, request.scope.setdefault("state", {}))
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
        rendered = render_chat(body, chat, limits)
        if length > limits.max_tokens:
            field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            raise APIError(400, f"{field} must be 0 to {limits.max_tokens} characters (--max-tokens), not {length}", field)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        stops, seed = drawing(body, limits)
        stop = ((chat.end,) if chat.end else ()) + stops  # the end of a turn ends the reply
        ids = _encode(target.model, rendered, limits.unknown, "messages")
        waker = asyncio.Event()
        sequences = _submit(target, [Request(prompt_ids=ids, length=length, n=body.n, stop=stop, seed=seed,
                                             logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                             **_controls(body, target.model))], waker)
        reply = ChatReply(target, body, [rendered], sequences, seed, waker, request.scope.setdefault("state", {}),
                           rendered=rendered)
        if body.stream:
            return EventStream(reply)
        return await reply.whole()

    app.add_middleware(Gate, limits=limits, api_key=api_key, metrics=metrics, log=log)
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

"""The OpenAI request bodies `charrnn serve` accepts and what it checks of them: pydantic
checks types and fixed ranges, `Limits` the configurable ones; errors are OpenAI's JSON
shape (`APIError`, `error_body`)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Union

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from charrnn.config import EVAL_STREAMS, MAX_SEED
from charrnn.errors import TextError, check_text
from charrnn.serve.chat import ChatTemplate, Message


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

    echo: ClassVar[bool] = False  # what Reply asks of a completion body


class ScoreBody(_Body):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: Optional[str] = None
    text: str
    streams: int = Field(EVAL_STREAMS, ge=1, le=4096)
    surprisal: bool = False  # also each character's surprisal, in bits
    unknown: Optional[Literal["error", "skip"]] = None  # default: the server's --unknown



def drawing(body: _Drawing, limits: Limits) -> tuple[tuple[str, ...], int]:
    """What both routes check of a _Drawing body (choices within the limits, stop strings),
    and its stop strings and seed (drawn here when the body has none)."""
    if body.n > min(limits.max_n, limits.max_streams):
        raise APIError(400, f"n must be 1 to {min(limits.max_n, limits.max_streams)}, not {body.n}", "n")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > 4 or any(not 1 <= len(s) <= 64 for s in stops):
        raise APIError(400, "stop: at most 4 strings, each 1 to 64 characters", "stop")
    return tuple(stops), body.seed if body.seed is not None else secrets.randbelow(2**31)


def render_chat(body: ChatBody, chat: ChatTemplate, limits: Limits) -> str:
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


def validation_error(err: RequestValidationError) -> APIError:
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



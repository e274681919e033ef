"""A request's characters from the engine's thread to its client: `Bridge` wakes the event
loop at a bounded rate, `Reply` reads a request's sequences out as one response or as
events, and `EventStream` writes those events as server-sent events."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Callable

from fastapi.responses import JSONResponse, Response

from charrnn.serve.schemas import APIError, CompletionBody, error_body
from charrnn.serve.sequence import Sequence
from charrnn.serve.served import Served
from charrnn.version import __version__


class Reply:
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


class ChatReply(Reply):
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

    def __init__(self, reply: Reply):  # the body is written as it is drawn, not given here
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

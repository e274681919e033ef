"""What the engine serves: a Request, its Sequence (one prompt, its n choices, their
events), the Meter the engine reports to, and Busy, its refusal when every row and
the queue are full. Nothing here decodes (charrnn.serve.engine does)."""


from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch


class Busy(Exception):
    """Every row is in use and the queue is full: try again shortly."""


@dataclass(frozen=True)
class Request:
    prompt_ids: torch.Tensor  # (T,) int64, T >= 1
    length: int  # new characters per choice
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (id, bias)
    n: int = 1  # choices, each a row
    stop: tuple[str, ...] = ()  # a choice ends once it writes one of these (left out of its text)
    seed: int = 0
    logprobs: int | None = None  # None: none; k: the drawn character's and the k likeliest


@dataclass
class Choice:
    held: str = ""  # drawn but not yet handed on: it could still be the start of a stop string
    held_logprobs: list = field(default_factory=list)
    chars: int = 0  # characters handed on
    finish: str | None = None


class Sequence:
    """One prompt being decoded: its rows, its generator, its choices and its events."""

    def __init__(self, request: Request, waker: Any = None):
        self.request = request
        self.waker = waker  # the server's (an asyncio.Event); the engine only hands it back
        self.generator = torch.Generator().manual_seed(request.seed)
        self.choices = [Choice() for _ in range(request.n)]
        self.events: deque = deque()
        self.start = 0  # its first row
        self.drawn = 0  # steps drawn
        self.read_ids: torch.Tensor | None = None  # what the prior still needs, (n, m)
        self.cancelled = False
        self.finished = False
        self.submitted = time.perf_counter()
        self.first_char_s: float | None = None  # seconds from submit to the first character
        self.cancel_step: int | None = None
        self.freed_step: int | None = None  # the engine step at which its rows were freed

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.request.n)

    def cancel(self) -> None:
        """The client went away: the rows are freed at the start of the next step."""
        self.cancelled = True

    # -- the characters of one step, per choice -------------------------------------------

    def take(self, chars: list[str], logprobs: list | None) -> int:
        """Hand on one step's characters (one per choice); returns the characters handed on."""
        self.drawn += 1
        last = self.drawn >= self.request.length
        if not self.request.stop and logprobs is None and not last:  # the common case, kept short
            for j, char in enumerate(chars):
                self.events.append(("text", j, char, None))
                self.choices[j].chars += 1
            if self.first_char_s is None:
                self.first_char_s = time.perf_counter() - self.submitted
            return len(chars)
        handed = 0
        for j, char in enumerate(chars):
            choice = self.choices[j]
            if choice.finish is not None:
                continue
            choice.held += char
            if logprobs is not None:
                choice.held_logprobs.append(logprobs[j])
            stop = next((s for s in self.request.stop if choice.held.endswith(s)), None)
            if stop is not None:
                handed += self._hand_on(j, len(choice.held) - len(stop))
                choice.held, choice.held_logprobs = "", []  # the stop string itself is not handed on
                choice.finish = "stop"
            elif last:
                handed += self._hand_on(j, len(choice.held))
                choice.finish = "length"
            else:
                handed += self._hand_on(j, self._safe(choice.held))
            if choice.finish is not None:
                self.events.append(("finish", j, choice.finish))
        if all(c.finish is not None for c in self.choices):
            self.finished = True
            self.events.append(("end",))
        return handed

    def _safe(self, held: str) -> int:
        """How much of held can be handed on: all but its longest end that begins a stop string."""
        longest = max((len(s) for s in self.request.stop), default=1) - 1
        for k in range(min(len(held), longest), 0, -1):
            if any(s.startswith(held[-k:]) for s in self.request.stop):
                return len(held) - k
        return len(held)

    def _hand_on(self, j: int, count: int) -> int:
        """Hand on the first count held characters of choice j as a text event."""
        choice = self.choices[j]
        if count == 0:
            return 0
        text, choice.held = choice.held[:count], choice.held[count:]
        logprobs = None
        if self.request.logprobs is not None:
            logprobs, choice.held_logprobs = choice.held_logprobs[:count], choice.held_logprobs[count:]
        self.events.append(("text", j, text, logprobs))
        if self.first_char_s is None:
            self.first_char_s = time.perf_counter() - self.submitted
        choice.chars += count
        return count

    def end(self, message: str) -> None:
        """End it early (the server is stopping): an error event and the end."""
        self.finished = True
        self.events.append(("error", message))
        self.events.append(("end",))


class Meter:
    """What the engine reports as it runs (the server's Prometheus metrics); no-ops here."""

    def step(self, seconds: float, rows: int) -> None: ...

    def first_char(self, seconds: float) -> None: ...

    def chars(self, count: int) -> None: ...

    def primes(self, read: int, cached: int) -> None: ...


def _logprob_entries(log_probs: torch.Tensor, ids: torch.Tensor, k: int, alphabet: str) -> list:
    """Per row: (the drawn character, its log-probability, {character: log-probability} of the k likeliest)."""
    chars = [alphabet[i] for i in ids.tolist()]
    drawn = log_probs.gather(1, ids[:, None])[:, 0].tolist()
    if k == 0:
        return [(char, lp, {}) for char, lp in zip(chars, drawn)]
    values, indices = log_probs.topk(min(k, log_probs.shape[1]), dim=1)
    return [(char, lp, {alphabet[i]: v for i, v in zip(row_i, row_v)})
            for char, lp, row_i, row_v in zip(chars, drawn, indices.tolist(), values.tolist())]

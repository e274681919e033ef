"""Loss, bits per character and perplexity of a model on a text.

The text is scored with state carried from each character to the next: it is cut into
at most 64 contiguous streams run side by side (only the first character of each
stream is predicted from the start state), and the few characters left over continue
the last stream from its final state. Every character after the first is predicted once.
Training's validation uses this same function, so `charrnn eval` of the validation
split reproduces the validation loss training reported.

Fewer streams (`charrnn eval --streams N`) give each character more text before it,
and a lower loss, at the cost of speed: one stream reads the text as one sequence, as
papers report bits per character (what that costs and gains: docs/benchmarks.md).

`prior` (charrnn.model.startmix) is mixed into the first predictions of every read from the
start state, as sampling mixes it; None scores the network alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from charrnn import distributed
from charrnn.config import EVAL_STREAMS, DynamicSettings
from charrnn.device import autocast
from charrnn.model.network import CharRNN, State, evaluating
from charrnn.model.startmix import POSITIONS, StartMix

MIN_STREAM_LEN = 1024
CHUNK = 512
BLOCK_CHUNKS = 64  # chunks of every stream read from the ids at a time


@dataclass(frozen=True)
class EvalResult:
    chars: int  # characters scored (predicted)
    loss: float  # mean cross-entropy, nats per character
    dropped: int = 0  # unknown characters left out (--unknown skip)

    @property
    def bpc(self) -> float:
        return self.loss / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def as_dict(self) -> dict:
        return {"chars": self.chars, "loss": self.loss, "bpc": self.bpc, "perplexity": self.perplexity,
                "unknown_dropped": self.dropped}


def read(model: CharRNN, x: torch.Tensor, state: State | None, prior: StartMix | None) -> tuple[torch.Tensor, State]:
    """model(x, state), with the prior mixed into the first predictions when the read
    starts from the start state (state None): what every scorer and decoder reads."""
    logits, new_state = model(x, state)
    if state is None and prior is not None:
        logits = prior.mix(logits, x)
    return logits, new_state


@torch.no_grad()
def _run(model: CharRNN, x: torch.Tensor, y: torch.Tensor, state: State | None, dtype,
         chunk: int = CHUNK, prior: StartMix | None = None) -> tuple[torch.Tensor, State]:
    """Summed loss of (B, T) targets y given inputs x, chunk by chunk, and the final state."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], chunk):
        with autocast(x.device, dtype):
            logits, state = read(model, x[:, start : start + chunk], state, prior)
        target = y[:, start : start + chunk]
        total += F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="sum").double()
    return total, state


def stream_count(predictions: int, max_streams: int = EVAL_STREAMS) -> int:
    """How many streams `predictions` characters are scored in: at most max_streams, each
    at least MIN_STREAM_LEN long (a short text is one stream)."""
    return max(1, min(max_streams, predictions // MIN_STREAM_LEN))


def _streams(ids: torch.Tensor, max_streams: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ids cut into contiguous streams: inputs x and targets y, each (S, N), and how many
    of the len(ids) - 1 predictions they cover (the rest continue the last stream)."""
    count = len(ids) - 1
    streams = stream_count(count, max_streams)
    stream_len = count // streams
    used = streams * stream_len
    x = ids[:used].view(streams, stream_len).long()
    y = ids[1 : used + 1].view(streams, stream_len).long()
    return x, y, used


@torch.no_grad()
def evaluate(model: CharRNN, ids, device: torch.device, dtype=None, dropped: int = 0,
             max_streams: int = EVAL_STREAMS, chunk: int = CHUNK, prior: StartMix | None = None) -> EvalResult:
    """Score ids (a 1-D tensor of character ids, or a charrnn.data.prepared.IdReader) under
    model; see the module docstring. The streams are read BLOCKS columns at a time, so
    memory stays bounded whatever the text's length.

    Under torch.distributed each rank scores its share of the streams and the sums are
    all-reduced, so every rank returns the one-process figure.
    """
    count = len(ids) - 1
    if count < 1:
        return EvalResult(0, float("nan"), dropped)
    streams = stream_count(count, max_streams)
    stream_len = count // streams
    used = streams * stream_len
    group = distributed.current()
    per_rank = -(-streams // group.world_size)
    mine = range(group.rank * per_rank, min(streams, (group.rank + 1) * per_rank))
    total = torch.zeros((), dtype=torch.float64, device=device)
    if len(mine):
        with evaluating(model):
            state = None
            block = chunk * BLOCK_CHUNKS  # a multiple of chunk: the chunks fall where one whole read puts them
            for begin in range(0, stream_len, block):
                end = min(stream_len, begin + block)
                window = torch.stack([ids[s * stream_len + begin : s * stream_len + end + 1] for s in mine])
                window = window.to(device).long()  # (S, columns + 1)
                part, state = _run(model, window[:, :-1], window[:, 1:], state, dtype, chunk, prior)
                total += part
            if used < count and mine[-1] == streams - 1:  # the tail continues the last stream
                last = tuple(s[:, -1:].contiguous() for s in state)
                tail = ids[used:].to(device).long()[None]
                tail_total, _ = _run(model, tail[:, :-1], tail[:, 1:], last, dtype, chunk)
                total += tail_total
    distributed.all_reduce(total)
    return EvalResult(count, total.item() / count, dropped)


@torch.no_grad()
def evaluate_windows(model: CharRNN, windows: torch.Tensor, device: torch.device, dtype=None,
                     chunk: int = CHUNK, prior: StartMix | None = None) -> EvalResult:
    """Score windows (W, L + 1) of ids, each read from the start state as evaluate reads a
    stream: what training's validation reads of a long split (charrnn.training.run.validation_windows)."""
    rows, length = windows.shape[0], windows.shape[1] - 1
    group = distributed.current()
    per_rank = -(-rows // group.world_size)
    mine = windows[group.rank * per_rank : (group.rank + 1) * per_rank].to(device).long()
    total = torch.zeros((), dtype=torch.float64, device=device)
    if len(mine):
        with evaluating(model):
            total, _ = _run(model, mine[:, :-1], mine[:, 1:], None, dtype, chunk, prior)
    distributed.all_reduce(total)
    return EvalResult(rows * length, total.item() / (rows * length))


def cold_start_places(length: int, windows: int, context: int, positions: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Where cold_start's reads from the start state begin: `windows` random indices."""
    return torch.randint(context, length - positions - 1, (windows,), generator=generator)


@torch.no_grad()
def cold_start(model: CharRNN, ids: torch.Tensor, windows: int = 256, context: int = 200, positions: int = POSITIONS,
               generator: torch.Generator | None = None, dtype=None,
               prior: StartMix | None = None) -> tuple[list[float], list[float]]:
    """How much worse the first characters read from the start state are.

    Takes `windows` random places in ids and returns the mean loss at each of the first
    `positions` predictions there, read (1) from the model's start state, with nothing
    before, and (2) after `context` characters of the text before them: (cold, warm).
    Both reads take the prior, as sampling does (it touches only the cold one's predictions).
    """
    if len(ids) < context + positions + 2:
        raise ValueError(f"need at least {context + positions + 2} characters")
    device = next(model.parameters()).device
    starts = cold_start_places(len(ids), windows, context, positions, generator)[:, None]
    span = ids[(starts + torch.arange(-context, positions + 1)).to(ids.device)].long().to(device)  # (W, C + P + 1)
    target = span[:, context + 1 :]  # (W, P)

    def losses(x: torch.Tensor) -> list[float]:
        with autocast(device, dtype):
            logits, _ = read(model, x, None, prior)
        logits = logits[:, -positions:].float()  # (W, P, V)
        return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(0).tolist()

    with evaluating(model):
        return losses(span[:, context : context + positions]), losses(span[:, : context + positions])


def dynamic_evaluate(model: CharRNN, ids: torch.Tensor, device: torch.device, settings: DynamicSettings,
                     dtype=None, dropped: int = 0, prior: StartMix | None = None) -> EvalResult:
    """Score ids with dynamic evaluation; the model's weights are as before afterwards."""
    count = len(ids) - 1
    if count < 1:
        return EvalResult(0, float("nan"), dropped)
    params = [p for p in model.parameters() if p.requires_grad]
    trained = [p.detach().clone() for p in params]
    mean_square = [torch.zeros_like(p) for p in params]
    ids = ids.to(device)
    x, y, used = _streams(ids, settings.streams)
    total = torch.zeros((), dtype=torch.float64, device=device)
    steps = [0]

    def adapt(x_part: torch.Tensor, y_part: torch.Tensor, state):
        for start in range(0, x_part.shape[1], settings.segment):
            # No graph when there is no step to take: then this is plain evaluation, and
            # bit for bit so (oneDNN picks other LSTM kernels when autograd records).
            with autocast(device, dtype), torch.set_grad_enabled(settings.step_size > 0):
                logits, state = read(model, x_part[:, start : start + settings.segment], state, prior)
            target = y_part[:, start : start + settings.segment]
            loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="sum")
            nonlocal total
            total += loss.detach().double()
            state = tuple(s.detach() for s in state)
            if settings.step_size:
                steps[0] += 1
                _dynamic_step(params, trained, mean_square, loss / target.numel(), settings, steps[0])
        return state

    try:
        with evaluating(model):  # no dropout; gradients still flow
            state = adapt(x, y, None)
            if used < count:  # the tail continues the last stream, as in evaluate
                last = tuple(s[:, -1:].contiguous() for s in state)
                adapt(ids[used:count].long()[None], ids[used + 1 :].long()[None], last)
    finally:
        with torch.no_grad():
            for p, original in zip(params, trained):
                p.copy_(original)
        model.zero_grad(set_to_none=True)
    return EvalResult(count, total.item() / count, dropped)


def _dynamic_step(params, trained, mean_square, loss: torch.Tensor, settings: DynamicSettings, step: int) -> None:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    correction = 1.0 - settings.beta**step  # the average of few squares is too small at first
    with torch.no_grad():
        for p, p0, ms, g in zip(params, trained, mean_square, grads):
            if g is None:
                continue
            ms.mul_(settings.beta).addcmul_(g, g, value=1 - settings.beta)
            p.addcdiv_(g, (ms / correction).sqrt_().add_(settings.eps), value=-settings.step_size)
            p.add_(p0 - p, alpha=settings.decay)

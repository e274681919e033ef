"""Loss, bits per character and perplexity of a model on a text.

The text is scored with state carried from each character to the next: it is cut into
at most 64 contiguous streams run side by side (only the first character of each
stream is predicted from a zero state), and the few characters left over continue the
last stream from its final state. Every character after the first is predicted once.
Training's validation uses this same function, so `charrnn eval` of the validation
split reproduces the validation loss training reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from charrnn import distributed
from charrnn.device import autocast
from charrnn.model import CharRNN, State

MAX_STREAMS = 64
MIN_STREAM_LEN = 1024
CHUNK = 512


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


@torch.no_grad()
def _run(model: CharRNN, x: torch.Tensor, y: torch.Tensor, state: State | None, dtype) -> tuple[torch.Tensor, State]:
    """Summed loss of (B, T) targets y given inputs x, chunk by chunk, and the final state."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], CHUNK):
        with autocast(x.device, dtype):
            logits, state = model(x[:, start : start + CHUNK], state)
        target = y[:, start : start + CHUNK]
        total += F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="sum")
    return total, state


@torch.no_grad()
def evaluate(model: CharRNN, ids: torch.Tensor, device: torch.device, dtype=None, dropped: int = 0) -> EvalResult:
    """Score ids (a 1-D tensor of character ids) under model; see the module docstring.

    Under torch.distributed each rank scores its share of the streams and the sums are
    all-reduced, so every rank returns the one-process figure.
    """
    count = len(ids) - 1
    if count < 1:
        return EvalResult(0, float("nan"), dropped)
    was_training = model.training
    model.eval()
    streams = max(1, min(MAX_STREAMS, count // MIN_STREAM_LEN))
    stream_len = count // streams
    used = streams * stream_len
    ids = ids.to(device)
    x = ids[:used].view(streams, stream_len).long()
    y = ids[1 : used + 1].view(streams, stream_len).long()
    group = distributed.current()
    per_rank = -(-streams // group.world_size)
    mine = slice(group.rank * per_rank, min(streams, (group.rank + 1) * per_rank))
    total = torch.zeros((), dtype=torch.float64, device=device)
    if mine.start < mine.stop:
        total, state = _run(model, x[mine], y[mine], None, dtype)
        if used < count and mine.stop == streams:  # the tail continues the last stream
            last = tuple(s[:, -1:].contiguous() for s in state)
            tail_total, _ = _run(model, ids[used:count].long()[None], ids[used + 1 :].long()[None], last, dtype)
            total += tail_total
    distributed.all_reduce(total)
    model.train(was_training)
    return EvalResult(count, total.item() / count, dropped)

"""Two decoders side by side as one: how the server's decoder grows past LANES_FROM streams
without its rows' bits depending on the width (`widen`)."""

from __future__ import annotations

import torch

from charrnn.infer import rows as row_kernel
from charrnn.infer.decode import Decoder

LANES_FROM = 16  # streams: from here the server's decoder is two lanes (Lanes)


class Lanes:
    """Two invariant decoders side by side, rows [0, a) in the first and [a, N) in the
    second, stepped at once on two threads (torch's ops and the row kernel let go of the
    GIL) when threads > 1: the server's wide decoder. Each lane runs its elementwise maths
    on one intra-op thread, on its own rows and scratch rows, so every row's bits are what
    one decoder gives; two lanes halve that maths' time as well as the products'."""

    invariant = True

    def __init__(self, first: Decoder, second: Decoder):
        first.threads = second.threads = 1  # a lane's products stay on its own thread
        self.lanes = (first, second)
        self.split = first.num_streams
        self.num_streams = first.num_streams + second.num_streams
        self.threads = 1
        self.logits = torch.empty(self.num_streams, first.vocab_size)

    def with_streams(self, num_streams: int) -> "Decoder | Lanes":
        return widen(self, num_streams)

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        first, second = self.lanes
        if self.threads > 1:
            other = row_kernel.helper().submit(second.step, ids[self.split :])
            self.logits[: self.split] = first.step(ids[: self.split])
            self.logits[self.split :] = other.result()
        else:
            self.logits[: self.split] = first.step(ids[: self.split])
            self.logits[self.split :] = second.step(ids[self.split :])
        return self.logits

    def state(self, rows: slice | torch.Tensor = slice(None)) -> tuple[torch.Tensor, ...]:
        both = zip(self.lanes[0].state(), self.lanes[1].state())
        return tuple(torch.cat(pair, dim=1)[:, rows] for pair in both)

    @torch.no_grad()
    def load_state(self, state: tuple[torch.Tensor, ...], rows: slice | torch.Tensor = slice(None)) -> None:
        index = torch.arange(self.num_streams)[rows]
        mine = index < self.split
        self.lanes[0].load_state(tuple(x[:, mine] for x in state), index[mine])
        self.lanes[1].load_state(tuple(x[:, ~mine] for x in state), index[~mine] - self.split)

    @torch.no_grad()
    def move(self, source: slice | torch.Tensor, target: slice | torch.Tensor) -> None:
        self.load_state(self.state(source), target)


def widen(decoder: "Decoder | Lanes", num_streams: int) -> "Decoder | Lanes":
    """decoder.with_streams(num_streams), as two lanes from LANES_FROM streams up when the
    decoder is invariant (the server's)."""
    if isinstance(decoder, Lanes):
        decoder = decoder.lanes[0]
    if not decoder.invariant or num_streams < LANES_FROM:
        return decoder.with_streams(num_streams)
    half = num_streams // 2
    return Lanes(decoder.with_streams(half), decoder.with_streams(num_streams - half))

"""Weight averaging: an exponential moving average (EMA) of the weights during training.

    avg <- avg + (1 - d_t) (w - avg),   d_t = min(decay, (1 + t) / (10 + t))

after every optimizer step t. The averaged weights smooth out the noise of the last
few hundred steps (a cheap form of Polyak averaging); validation, `best.pt` and
sampling use them, training goes on with the raw weights. The warm-up of d_t keeps the
random initial weights from lingering in the average of a short run (with d = 0.998
fixed, they would still weigh 13 % after 1000 steps).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.averaged = [p.detach().clone() for p in self.params]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average (after an optimizer step)."""
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.averaged, [p.detach() for p in self.params], weight)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's parameter names."""
        return {name: avg.detach().cpu() for name, avg in zip(self.names, self.averaged)}

    @torch.no_grad()
    def load(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        for name, avg in zip(self.names, self.averaged):
            avg.copy_(weights[name])
        self.updates = updates

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones again after."""
        saved = [p.detach().clone() for p in self.params]
        for p, avg in zip(self.params, self.averaged):
            p.copy_(avg)
        try:
            yield
        finally:
            for p, own in zip(self.params, saved):
                p.copy_(own)

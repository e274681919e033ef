"""Everything a run changes as it trains, as one typed object that turns into a
checkpoint and back: the model, the optimizer, the weight average, the progress
counters, the random streams, the data cursors, the carried state and the start mix.

`TrainState.checkpoint` builds the Checkpoint that last.pt and best.pt hold (with what
the run is, from its Plan); `TrainState.restore` puts a resumed run back exactly where
that checkpoint left it, so a resumed run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from charrnn import distributed
from charrnn.data.batches import RandomWindows, RestartingStreams, StatefulBatches
from charrnn.errors import UsageError
from charrnn.model.network import CharRNN, State
from charrnn.model.startmix import StartMix
from charrnn.store.checkpoint import Checkpoint
from charrnn.training.average import WeightAverage

Batches = StatefulBatches | RandomWindows | RestartingStreams


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # completed passes over the training split
    batch: int = 0  # next batch within the epoch
    elapsed_s: float = 0.0  # wall-clock seconds of training so far, across resumes
    chars_seen: int = 0
    best_val_loss: float = math.inf
    val_loss: float = math.nan
    window_loss_sum: float = 0.0  # train loss summed since the last validation
    window_steps: int = 0


@dataclass
class TrainState:
    model: CharRNN
    optimizer: torch.optim.Optimizer
    average: WeightAverage | None  # --ema-decay: validation, best.pt and samples use the average
    progress: Progress
    windows_rng: torch.Generator  # the batches' random places, the same on every rank
    batches: Batches  # the data cursors (RestartingStreams' positions)
    prior: StartMix | None  # the start mix, fit at each validation
    carried: State | None = None  # stateful training: the state carried into the next batch
    # The train loss summed since the last validation, on the device (no per-step sync).
    window_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))

    def checkpoint(self, **run) -> Checkpoint:
        """Everything resume needs (run: model_config, vocab, train_config, corpus, parent).
        A collective under DDP: every rank gathers the carried state."""
        self.progress.window_loss_sum = self.window_loss.item()
        device = self.window_loss.device
        rng = {"torch": torch.get_rng_state(), "windows": self.windows_rng.get_state()}
        if device.type == "cuda":
            rng["cuda"] = [torch.cuda.get_rng_state(device)]
        carried = [distributed.gather_rows(s.detach()).cpu() for s in self.carried] if self.carried is not None else []
        extra = {}
        if isinstance(self.batches, RestartingStreams):
            extra["cursors"] = self.batches.cursors.clone()
        if self.prior is not None:
            extra["start_mix"] = self.prior.state()
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.average is not None:  # inference uses the average; training resumes from the raw weights
            extra.update(train_weights=weights, ema_updates=self.average.updates)
            weights = self.average.state_dict()
        return Checkpoint(model=weights, optimizer=self.optimizer.state_dict(), progress=asdict(self.progress),
                          carried_state=carried, rng=rng, **run, **extra)

    def restore(self, payload: Checkpoint, batch_size: int, rows: slice, is_main: bool) -> None:
        """Continue from payload: weights, optimizer, progress, carried state (this rank's
        rows), cursors, random streams and the start mix's weights."""
        device = self.window_loss.device
        # With weight averaging, "model" holds the averaged weights and "train_weights" the raw ones.
        self.model.load_state_dict(payload.train_weights or payload.model)
        if self.average is not None:
            # Without ema_updates, averaging was turned on at this resume: it starts here.
            self.average.load(payload.model, payload.ema_updates or 0)
        self.optimizer.load_state_dict(payload.optimizer)
        if self.prior is not None and payload.start_mix is not None:
            self.prior.weights = payload.start_mix["weights"].float().clone()  # as fit at its last validation
        self.progress = Progress(**{k: payload.progress[k] for k in Progress.__dataclass_fields__})
        self.window_loss = torch.tensor(self.progress.window_loss_sum, device=device)
        carried = payload.carried_state or []
        if carried and carried[0].shape[1] != batch_size:
            raise UsageError("--batch-size cannot change when resuming a stateful run")
        self.carried = tuple(s[:, rows].to(device) for s in carried) or None
        if isinstance(self.batches, RestartingStreams):
            self.batches.cursors = payload.cursors.clone()  # all B streams, as every rank keeps them
        self.windows_rng.set_state(payload.rng["windows"])
        if is_main:  # other ranks keep their own dropout streams
            torch.set_rng_state(payload.rng["torch"])
            if device.type == "cuda" and payload.rng.get("cuda"):
                torch.cuda.set_rng_state(payload.rng["cuda"][0], device)

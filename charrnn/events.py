"""What a run reports as it goes: typed events for `on_event(event)`.

The library never prints; the CLI renders these on stderr (charrnn.cli), the TensorBoard
sink writes them (charrnn.viz.tensorboard), and a notebook can collect them. Every event is a
frozen dataclass; `dataclasses.asdict(event)` gives a JSON-able dict (a `Validation` is
exactly the record appended to metrics.jsonl, a `Sample` the line of samples.jsonl).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union


@dataclass(frozen=True)
class Setup:
    """Once, before the first step: what was chosen and why."""

    run_dir: str
    resumed_step: int | None  # None for a new run
    device: str
    device_reason: str
    dtype: str
    dtype_reason: str
    parameters: int
    vocab_size: int
    train_chars: int
    val_chars: int
    steps_per_epoch: int
    config: dict[str, Any]  # the resolved TrainConfig
    model_config: dict[str, Any]
    sizing: dict[str, Any] | None = None  # {"fields", "reason"} when charrnn.training.sizing chose them
    parent: dict[str, Any] | None = None  # {"path", "added_chars"} when fine-tuning
    start_mix: dict[str, Any] | None = None  # StartMix.summary(), when on
    val_read: int | None = None  # characters each validation reads when not the whole split
    prepared: dict[str, Any] | None = None  # {"path", "reused"} of the corpus's id file


@dataclass(frozen=True)
class Preparing:
    """While a corpus is prepared (charrnn.data.prepared): bytes done of total in a pass."""

    phase: str  # "checking" (UTF-8, vocabulary, hash) or "encoding"
    done: int
    total: int


@dataclass(frozen=True)
class Step:
    """Every few steps (charrnn.training.trainer.LOG_EVERY): for a progress bar."""

    step: int
    loss: float  # mean training loss since the last Step
    lr: float
    chars_per_s: float
    fraction: float  # of the run done, 0..1
    epoch: float


@dataclass(frozen=True)
class Validation:
    """Each validation: the record appended to metrics.jsonl."""

    step: int
    epoch: float
    train_loss: float  # mean since the previous validation
    val_loss: float
    val_bpc: float
    best_val_loss: float
    lr: float
    grad_norm: float
    chars_per_s: float
    elapsed_s: float


@dataclass(frozen=True)
class Sample:
    """The text sampled at a validation: the line appended to samples.jsonl."""

    step: int
    text: str


@dataclass(frozen=True)
class Notice:
    """A line for the user: a warning (a repaired file, a skipped input) or information."""

    message: str
    warning: bool = True


Event = Union[Setup, Preparing, Step, Validation, Sample, Notice]
OnEvent = Callable[[Event], None]

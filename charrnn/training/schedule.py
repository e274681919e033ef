"""The learning-rate schedule and how far a run is: pure functions of the config and the
progress, which the trainer calls at every step."""

from __future__ import annotations

import math

from charrnn.config import TrainConfig
from charrnn.training.trainstate import Progress


def lr_at(config: TrainConfig, step: int, fraction: float) -> float:
    """Linear warmup over warmup_steps, the peak held, then cosine decay to min_lr_ratio
    over the last decay_frac of the run (fraction = how far the run is, 0..1)::

        lr |   ______________
           |  /              `-.
           | /                  `-._  min_lr_ratio
           +---------------------------> fraction
            warmup           1 - decay_frac   1
    """
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    start = 1.0 - config.decay_frac
    decayed = min(1.0, max(0.0, (fraction - start) / config.decay_frac)) if config.decay_frac else 0.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * decayed))
    return config.learning_rate * warm * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def fraction_done(config: TrainConfig, progress: Progress, steps_per_epoch: int) -> float:
    """How far training is, 0..1, by whichever stop condition is nearest."""
    parts = []
    if config.steps:
        parts.append(progress.step / config.steps)
    if config.epochs:
        parts.append((progress.epoch + progress.batch / steps_per_epoch) / config.epochs)
    if config.time:
        parts.append(progress.elapsed_s / config.time_budget_s)
    return max(parts)

"""The learning-rate schedule: warmup, the peak held, cosine decay over the last part."""

import pytest

from charrnn.config import TrainConfig
from charrnn.training.schedule import lr_at


def test_learning_rate_warms_up_then_decays():
    config = TrainConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_frac=1.0)
    assert lr_at(config, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(config, 9, 0.0) == pytest.approx(1.0)
    assert lr_at(config, 100, 0.5) == pytest.approx(0.55)
    assert lr_at(config, 100, 1.0) == pytest.approx(0.1)


def test_learning_rate_holds_its_peak_then_decays_over_the_last_decay_frac():
    config = TrainConfig(learning_rate=1.0, warmup_steps=0, min_lr_ratio=0.1, decay_frac=0.2)
    assert lr_at(config, 50, 0.0) == lr_at(config, 500, 0.8) == 1.0
    assert lr_at(config, 900, 0.9) == pytest.approx(0.55)
    assert lr_at(config, 1000, 1.0) == pytest.approx(0.1)
    constant = TrainConfig(learning_rate=1.0, warmup_steps=0, decay_frac=0.0)
    assert lr_at(constant, 1000, 1.0) == 1.0
    whole = TrainConfig(learning_rate=1.0, warmup_steps=0, min_lr_ratio=0.1, decay_frac=1.0)
    assert lr_at(whole, 100, 0.5) == pytest.approx(0.55)

"""Resolve, then run: every decision about a run is made in charrnn.training.run before the
trainer starts, and the trainer takes the plan as it is."""

from dataclasses import replace

import pytest
import torch
from conftest import VERSE, corpus_of, tiny_configs

from charrnn.errors import DataError
from charrnn.store import checkpoint
from charrnn.training import sizing
from charrnn.training.run import resolve
from charrnn.training.trainer import Trainer


def test_the_plan_holds_every_choice_and_the_trainer_never_replaces_it(tmp_path):
    model_config, train_config = tiny_configs(train={"steps": 0})  # no stop given: 10 epochs
    plan = resolve(corpus_of(VERSE * 20), model_config, train_config, tmp_path / "run", auto=sizing.SIZED_TRAIN)
    assert plan.config.epochs == 10 and plan.config.steps == 0
    assert plan.config.batch_size == 16  # chosen for an LSTM on a CPU
    assert plan.config.eval_every == sizing.eval_every_for(16)
    assert plan.sizing is not None and plan.sizing["fields"] == list(sizing.SIZED_TRAIN)
    assert len(plan.train_ids) + len(plan.val_ids) == len(VERSE * 20)
    trainer = Trainer(replace(plan, config=replace(plan.config, epochs=0.0, steps=3)))
    assert trainer.config is trainer.plan.config  # the one config, as resolved
    trainer.run()
    assert trainer.config.steps == 3 and trainer.state.progress.step == 3


def test_a_resumed_plan_keeps_the_runs_own_choices_and_refuses_another_text(trained_run, tmp_path):
    payload = checkpoint.load(trained_run / "last.pt")
    model_config, train_config = tiny_configs(train={"batch_size": 4})
    plan = resolve(corpus_of(VERSE * 20), model_config, train_config, trained_run, resume=payload,
                   auto=sizing.SIZED_TRAIN + ("hidden_size",))
    assert plan.sizing is None and plan.config.batch_size == 4 and plan.vocab.chars == payload.vocab
    with pytest.raises(DataError, match="differs from the one the run was trained on"):
        resolve(corpus_of(VERSE * 21), model_config, train_config, trained_run, resume=payload)


def test_a_fine_tuning_plan_extends_the_base_vocabulary(trained_run, tmp_path):
    payload = checkpoint.load(trained_run / "best.pt")
    model_config, train_config = tiny_configs()
    plan = resolve(corpus_of(VERSE * 10 + "ñ¿" * 40), model_config, train_config, tmp_path / "ft", base=payload)
    assert plan.parent == {"path": payload.path, "added_chars": "".join(sorted("ñ¿"))}
    assert set(plan.vocab.chars) == set(payload.vocab) | set("ñ¿")
    assert isinstance(plan.train_ids, torch.Tensor)


def test_a_validation_split_too_short_is_refused_before_training(tmp_path):
    model_config, train_config = tiny_configs(train={"val_frac": 0.001, "batch_size": 1, "seq_len": 4})
    with pytest.raises(DataError, match="validation split has"):
        resolve(corpus_of("abcdefghij" * 20), model_config, train_config, tmp_path / "r")
    assert not (tmp_path / "r").exists()

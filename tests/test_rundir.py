"""The run directory: its JSONL records, trimmed and repaired on resume, and where a run goes."""

import json

import pytest
from conftest import VERSE, corpus_of, tiny_configs

from charrnn import events
from charrnn.config import TrainConfig
from charrnn.store import checkpoint
from charrnn.training.run import trainer_for


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_heals_a_torn_last_line_of_metrics_and_names_damage_elsewhere(tmp_path):
    from charrnn.errors import DataError

    corpus = corpus_of(VERSE * 20)
    model_config, train_config = tiny_configs(train={"steps": 8, "eval_every": 4})
    run_dir = tmp_path / "run"
    trainer_for(corpus, model_config, train_config, run_dir).run()
    metrics = run_dir / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 12, "train_lo')  # what a crash or a full disk leaves
    warnings = []
    on_event = lambda event: warnings.append(event.message) if isinstance(event, events.Notice) else None
    longer = TrainConfig(**{**train_config.__dict__, "steps": 12})
    trainer_for(corpus, model_config, longer, run_dir, on_event=on_event,
                resume=checkpoint.load(run_dir / "last.pt")).run()
    assert len(warnings) == 1 and "metrics.jsonl" in warnings[0] and "last line" in warnings[0]
    assert [m["step"] for m in _metrics(run_dir)] == [4, 8, 12]

    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    before = metrics.read_bytes()
    evenlonger = TrainConfig(**{**train_config.__dict__, "steps": 16})
    with pytest.raises(DataError, match=r"metrics.jsonl is damaged at line 2"):
        trainer_for(corpus, model_config, evenlonger, run_dir, resume=checkpoint.load(run_dir / "last.pt")).run()
    assert metrics.read_bytes() == before

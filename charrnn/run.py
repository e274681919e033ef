"""Starting a run: new, resumed (`resume`) or fine-tuned from another model (`init_from`).

The one entry that turns "train this text with these settings" into a Trainer: it reads
the config layers (defaults < TOML file < settings), the checkpoint to resume or start
from, the corpus, chooses the run directory and owns the distributed group's life. The
CLI's `charrnn train` and the Python API's `charrnn.train` both call `train()` here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from charrnn import checkpoint, distributed
from charrnn.config import ModelConfig, TrainConfig, build, field_names, load_toml
from charrnn.data import read_corpus
from charrnn.errors import TrainingInterrupted, UsageError
from charrnn.sizing import SIZED, SIZED_DECAY, SIZED_TRAIN
from charrnn.events import Notice, OnEvent
from charrnn.trainer import Trainer, choose_run_dir, resume_configs

MODEL_FIELDS = tuple(field_names(ModelConfig))
TRAIN_FIELDS = tuple(field_names(TrainConfig))


def split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and train fields of a flat {field: value} (None = not given); unknown keys are errors."""
    unknown = sorted(set(settings) - set(MODEL_FIELDS) - set(TRAIN_FIELDS))
    if unknown:
        raise UsageError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(MODEL_FIELDS + TRAIN_FIELDS)}")
    return ({k: v for k, v in settings.items() if k in MODEL_FIELDS},
            {k: v for k, v in settings.items() if k in TRAIN_FIELDS})


def train(corpus: str | Path | Sequence[str | Path] | None = None, *, config: str | Path | None = None,
          out: str | Path | None = None, resume: str | Path | None = None, init_from: str | Path | None = None,
          encoding: str = "utf-8", on_event: OnEvent | None = None, **settings: Any) -> dict[str, Any] | None:
    """Train a model and return the run's summary (None on the other ranks under torchrun).

    corpus: text files, directories or "-" (stdin); None: the embedded Python docs (or,
    with resume, the run's own files). settings: any ModelConfig / TrainConfig field
    (hidden_size=256, time="5m", ...), over the TOML file's, over the defaults.
    resume: a run directory (or its last.pt) to continue exactly. init_from: a run
    directory or .pt whose weights start a new run on this corpus (fine-tuning).
    """
    emit = on_event or (lambda event: None)
    sources = [str(corpus)] if isinstance(corpus, (str, Path)) else [str(c) for c in corpus or []]
    # None means not given (the CLI passes every flag), so it must not hide the file's value.
    model_set, train_set = split_settings({k: v for k, v in settings.items() if v is not None})
    file_model, file_train = load_toml(config) if config else ({}, {})
    model_given = {**file_model, **model_set}
    train_given = {**file_train, **train_set}
    # The batch for the device unless given, and the validation interval for the batch
    # (given or chosen) unless given.
    auto_train = tuple(k for k in SIZED_TRAIN if k not in train_given)
    if resume is not None and init_from is not None:
        raise UsageError("--resume continues a run and --init-from starts a new one; give one of them")
    payload = base = None
    run_dir = None
    where = ""
    if resume is not None:
        resume = Path(resume)
        payload = checkpoint.load(resume / "last.pt" if resume.is_dir() else resume)
        _refuse_model_changes(payload, model_given, "when resuming")
        model_config, train_config = resume_configs(payload, {**file_train, **train_set})
        auto: tuple[str, ...] = ()
        run_dir, where = Path(payload.path).parent, "resumed"
        sources = sources or [s for s in payload.corpus["sources"] if not s.startswith("<embedded")]
        if sources == ["-"]:
            raise UsageError("this run was trained on stdin; pipe the same text again with: charrnn train - --resume DIR")
    elif init_from is not None:
        base = checkpoint.load(init_from)
        _refuse_model_changes(base, model_given, "when fine-tuning (the model comes from --init-from)")
        model_config = build(ModelConfig, base.model_config)
        train_config = build(TrainConfig, file_train, train_set)
        auto = auto_train
    else:
        model_config = build(ModelConfig, file_model, model_set)
        train_config = build(TrainConfig, file_train, train_set)
        auto = (tuple(k for k in SIZED if k not in model_given) + tuple(k for k in SIZED_DECAY if k not in train_given)
                + auto_train)  # chosen for the corpus and budget
    corpus_data = read_corpus(sources, encoding)
    group = distributed.init_from_env(train_config.device)  # a group of one without torchrun
    if run_dir is None:  # rank 0 picks the directory and tells the others
        run_dir, where = choose_run_dir(None if out is None else str(out), corpus_data.name) if group.is_main else (None, "")
        run_dir = Path(distributed.broadcast_text(str(run_dir) if run_dir else None))
    if group.is_main:
        if not sources:
            emit(Notice(f"corpus: {corpus_data.sources[0]} ({corpus_data.size:,} bytes); "
                        "pass files to train on your own text", warning=False))
        for skipped in corpus_data.skipped:
            emit(Notice(f"skipped {skipped}: not a UTF-8 text file"))
    clean = False
    try:
        summary = Trainer(corpus_data, model_config, train_config, run_dir, on_event=emit, resume=payload,
                          auto=auto, init_from=base).run()
        clean = True
    except TrainingInterrupted:
        clean = True  # every rank agreed to stop at the same step
        raise
    finally:
        distributed.shutdown(clean)
    return {**summary, "run_dir_reason": where} if group.is_main else None


def _refuse_model_changes(payload: checkpoint.Checkpoint, given: dict[str, Any], when: str) -> None:
    changed = [k for k, v in given.items() if payload.model_config.get(k) != v]
    if changed:
        raise UsageError(f"the model cannot change {when} ({', '.join(changed)}); drop those flags")

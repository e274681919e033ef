"""Resolve, then run: everything that decides a run, made once, before the trainer starts.

`train()` is the one entry that turns "train this text with these settings" into a run:
the CLI's `charrnn train` and the Python API's `charrnn.train` both call it. It reads
the config layers (defaults < TOML file < settings), the checkpoint to resume or start
from, and the corpus; `resolve()` then makes every decision left (device and dtype, the
batch and validation interval for the device, the vocabulary, the split and the batch
layout, the width, dropout and weight decay for the text and budget, agreed by every
rank under DDP) and returns a `Plan`; the Trainer receives the Plan finished and does
not re-decide it. `train()` also chooses the run directory and owns the distributed
group's life.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from charrnn import distributed
from charrnn.config import ModelConfig, TrainConfig, build, field_names, load_toml
from charrnn.data.batches import RandomWindows, RestartingStreams, StatefulBatches
from charrnn.data.encode import prepare
from charrnn.data.prepared import IdReader, Prepared, in_memory, reader_for
from charrnn.data.text import Corpus, Vocab, rereadable, split
from charrnn.device import resolve_device, resolve_dtype
from charrnn.errors import DataError, TrainingInterrupted, UsageError
from charrnn.events import Notice, OnEvent, Preparing
from charrnn.store import checkpoint, rundir
from charrnn.store.checkpoint import Checkpoint
from charrnn.training import sizing
from charrnn.training.finetune import extended_vocab
from charrnn.training.plan import Plan
from charrnn.training.trainer import Trainer

MODEL_FIELDS = tuple(field_names(ModelConfig))
# A validation reads at most VAL_WINDOWS x VAL_WINDOW characters (~1 M: what a full pass
# reads of a 10 MB corpus's split, so the figures of smaller corpora do not move).
VAL_WINDOWS, VAL_WINDOW = 64, 16384
DEVICE_IDS_MAX = 4 << 30  # bytes of ids copied whole to a GPU; a larger corpus stays mapped on the host
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
          encoding: str = "utf-8", on_event: OnEvent | None = None, dry_run: bool = False,
          **settings: Any) -> dict[str, Any] | None:
    """Train a model and return the run's summary (None on the other ranks under torchrun).

    corpus: text files, directories or "-" (stdin); None: the embedded Python docs (or,
    with resume, the run's own files). settings: any ModelConfig / TrainConfig field
    (hidden_size=256, time="5m", ...), over the TOML file's, over the defaults.
    dry_run: make every decision (the sizing probe included), report them in the Setup
    event, and return the plan's summary without training or writing anything.
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
    auto_train = tuple(k for k in sizing.SIZED_TRAIN if k not in train_given)
    if resume is not None and init_from is not None:
        raise UsageError("--resume continues a run and --init-from starts a new one; give one of them")
    payload = base = run_dir = None
    where = ""
    if resume is not None:
        resume = Path(resume)
        payload = checkpoint.load(resume / "last.pt" if resume.is_dir() else resume)
        _refuse_model_changes(payload, model_given, "when resuming")
        # As saved, with the train settings given now on top; a resumed run keeps its own choices.
        model_config = build(ModelConfig, payload.model_config)
        train_config = build(TrainConfig, payload.train_config, {**file_train, **train_set})
        auto: tuple[str, ...] = ()
        run_dir, where = Path(payload.path).parent, "resumed"
        sources = sources or rereadable(payload.corpus["sources"])
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
        auto = (tuple(k for k in sizing.SIZED if k not in model_given)
                + tuple(k for k in sizing.SIZED_FROM_PASSES if k not in train_given) + auto_train)  # for the corpus and budget
    group = distributed.init_from_env(train_config.device)  # a group of one without torchrun
    corpus_data = _prepared(sources, encoding, emit)
    if run_dir is None:  # rank 0 picks the directory and tells the others
        run_dir, where = rundir.choose(None if out is None else str(out), corpus_data.name) if group.is_main else (None, "")
        run_dir = Path(distributed.broadcast_text(str(run_dir) if run_dir else None))
    if group.is_main:
        if not sources:
            emit(Notice(f"corpus: {corpus_data.sources[0]} ({corpus_data.size:,} bytes); "
                        "pass files to train on your own text", warning=False))
        for skipped in corpus_data.skipped:
            emit(Notice(f"skipped {skipped}: not a UTF-8 text file"))
    clean = False
    try:
        plan = resolve(corpus_data, model_config, train_config, run_dir, resume=payload, base=base, auto=auto)
        trainer = Trainer(plan, emit)  # reports the plan (events.Setup); writes nothing before run()
        summary = plan.summary() if dry_run else trainer.run()
        clean = True
    except TrainingInterrupted:
        clean = True  # every rank agreed to stop at the same step
        raise
    finally:
        distributed.shutdown(clean)
    return {**summary, "run_dir_reason": where} if group.is_main else None


def _prepared(sources: list[str], encoding: str, emit) -> Prepared:
    """The corpus as mapped ids: rank 0 prepares it (or finds it prepared), then the other
    ranks map the same file, so the page cache holds one copy however many ranks read it."""
    group = distributed.current()

    def progress(phase: str, done: int, total: int) -> None:
        emit(Preparing(phase, done, total))

    if group.world_size == 1:
        return prepare(sources, encoding, on_progress=progress, on_notice=lambda m: emit(Notice(m)))
    corpus, failed = None, None
    if group.is_main:
        try:
            corpus = prepare(sources, encoding, on_progress=progress, on_notice=lambda m: emit(Notice(m)))
        except Exception as err:  # the other ranks must hear of it, not wait forever
            failed = err
    if distributed.broadcast_text("failed" if failed else "ready") == "failed":
        if failed is not None:
            raise failed
        raise DataError("rank 0 could not prepare the corpus (its error is in its output)")
    return corpus if corpus is not None else prepare(sources, encoding)


def resolve(corpus: Corpus | Prepared, model_config: ModelConfig, train_config: TrainConfig, run_dir: str | Path, *,
            resume: Checkpoint | None = None, base: Checkpoint | None = None, auto: tuple[str, ...] = ()) -> Plan:
    """Every decision about a run, made before it starts.

    auto: the model fields (sizing.SIZED) and the optimiser's (sizing.SIZED_FROM_PASSES) to
    choose for this corpus and budget rather than take from the configs, and the training
    fields (sizing.SIZED_TRAIN) to choose for the device; a resumed run keeps its own.
    base: a loaded checkpoint whose weights start this run (fine-tuning; model_config
    must be its own), its vocabulary extended by this corpus's new characters."""
    group = distributed.current()
    if isinstance(corpus, Corpus):  # held in memory (tests, scripts): encoded here
        corpus = in_memory(corpus)
    device, device_reason = resolve_device(train_config.device)
    device = distributed.rank_device(device)  # this rank's, under DDP
    dtype, dtype_reason = resolve_dtype(train_config.dtype, device, lstm=model_config.cell == "lstm")
    config = train_config.with_default_stop()
    auto = auto if resume is None else ()
    reasons = []
    if "batch_size" in auto:
        batch_size, why = sizing.batch_for(device, model_config.cell, group.world_size)
        config = replace(config, batch_size=batch_size)
        reasons.append(why)
    if "eval_every" in auto:  # as many sequences apart whatever the batch
        config = replace(config, eval_every=sizing.eval_every_for(config.batch_size))

    parent = None
    if resume is not None:
        vocab, parent = Vocab(resume.vocab), resume.parent
        if resume.corpus.get("sha256") not in (None, corpus.sha256):
            raise DataError("this corpus differs from the one the run was trained on; give the same files to --resume")
    elif base is not None:
        vocab, added = extended_vocab(Vocab(base.vocab), corpus.vocab)
        parent = {"path": base.path, "added_chars": added}
    else:
        vocab = corpus.vocab
    ids = corpus.ids_for(vocab)  # (N,) mapped from the prepared file: nothing proportional to it is copied
    # On a GPU the encoded corpus (1 byte a character) lives there whole when it is not
    # large, so a step copies nothing from the host; a larger one stays mapped on the host.
    if device.type != "cpu" and len(ids) * ids.element_size() <= DEVICE_IDS_MAX:
        ids = ids.to(device)
    train_ids, val_ids = split(ids, config.val_frac)
    batches = _batches(config, train_ids, group.rows(config.batch_size), reader_for(corpus, train_ids))
    if len(val_ids) < 2:
        raise DataError(f"the validation split has {len(val_ids)} character(s); use a longer corpus or a larger --val-frac")
    val_reader = reader_for(corpus, val_ids)  # what validation reads of a long split, read without the map
    val_windows = validation_windows(val_ids if val_reader is None else val_reader, config.seed)

    choice = None
    if any(k in sizing.SIZED + sizing.SIZED_FROM_PASSES for k in auto):
        choice = _choose_size(model_config, config, auto, len(train_ids), len(vocab), device, dtype)
        model_config = replace(model_config, **{k: getattr(choice, k) for k in auto if k in sizing.SIZED})
        config = replace(config, **{k: getattr(choice, k) for k in auto if k in sizing.SIZED_FROM_PASSES})
        reasons.insert(0, choice.reason(len(train_ids), config.stop_text))
    return Plan(corpus, model_config, config, vocab, train_ids, val_ids, val_windows, val_reader, batches, device, device_reason, dtype,
                dtype_reason, Path(run_dir), resume, base, parent,
                sizing={"fields": list(auto), "reason": "; ".join(reasons)} if reasons else None,  # not for eval_every alone
                probe_s=choice.probe_s if choice else 0.0)


def validation_windows(val_ids: torch.Tensor | IdReader, seed: int) -> torch.Tensor | None:
    """What each validation of a run reads when its split is long: VAL_WINDOWS windows of
    VAL_WINDOW characters (+1 for the last target) at places drawn once from the seed, so
    every validation reads the same characters in bounded time. None (read it all, as
    `charrnn eval` does) when the split has at most VAL_WINDOWS x VAL_WINDOW characters."""
    if len(val_ids) <= VAL_WINDOWS * VAL_WINDOW + 1:
        return None
    generator = torch.Generator().manual_seed(seed + 2)
    starts = torch.randint(0, len(val_ids) - VAL_WINDOW, (VAL_WINDOWS,), generator=generator).sort().values
    if isinstance(val_ids, IdReader):
        return val_ids.windows(starts, VAL_WINDOW + 1)
    return torch.stack([val_ids[s : s + VAL_WINDOW + 1] for s in starts.tolist()])  # (W, L + 1), a copy


def _batches(config: TrainConfig, train_ids: torch.Tensor, rows: slice, reader=None):
    """The batch layout of config: random windows, restarting streams or fixed streams
    (reader: the ids' IdReader, which the batches read instead of the map)."""
    if config.stateless:
        return RandomWindows(train_ids, config.batch_size, config.seq_len, rows, reader)
    if config.stream_restart > 0:
        return RestartingStreams(train_ids, config.batch_size, config.seq_len, config.stream_restart, rows, reader)
    return StatefulBatches(train_ids, config.batch_size, config.seq_len, rows, reader)


def _choose_size(model_config: ModelConfig, config: TrainConfig, auto: tuple[str, ...], train_chars: int,
                 vocab_size: int, device: torch.device, dtype) -> sizing.Choice:
    """Rank 0 chooses (its probe times this machine) and every rank takes its choice."""
    group = distributed.current()
    choice = None
    if group.is_main:
        widths = sizing.WIDTHS if "hidden_size" in auto else (model_config.hidden_size,)
        choice = sizing.choose(model_config, config, train_chars, vocab_size, device, dtype, widths=widths)
    if group.world_size > 1:
        text = distributed.broadcast_text(json.dumps(asdict(choice)) if choice else None)
        choice = sizing.Choice(**json.loads(text))
    return choice


def trainer_for(corpus: Corpus, model_config: ModelConfig, train_config: TrainConfig, run_dir: str | Path,
                on_event: OnEvent | None = None, **resolving: Any) -> Trainer:
    """A Trainer for these configs, resolved as `train()` resolves them (resolving:
    resume=, base=, auto=): the entry for tests and scripts that drive a run themselves."""
    return Trainer(resolve(corpus, model_config, train_config, run_dir, **resolving), on_event)


def _refuse_model_changes(payload: Checkpoint, given: dict[str, Any], when: str) -> None:
    changed = [k for k, v in given.items() if payload.model_config.get(k) != v]
    if changed:
        raise UsageError(f"the model cannot change {when} ({', '.join(changed)}); drop those flags")

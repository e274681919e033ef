"""The Plan: a run with every decision made, what `resolve()` (charrnn.training.run) returns
and the Trainer (charrnn.training.trainer) receives. Its own module so that the resolver and
the trainer both import it and neither imports the other's."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from charrnn.config import ModelConfig, TrainConfig
from charrnn.data.batches import RandomWindows, RestartingStreams, StatefulBatches
from charrnn.data.prepared import IdReader, Prepared
from charrnn.data.text import Vocab
from charrnn.device import dtype_name
from charrnn.store.checkpoint import Checkpoint


@dataclass(frozen=True)
class Plan:
    """A run with every decision made: what the Trainer receives."""

    corpus: Prepared
    model_config: ModelConfig
    config: TrainConfig  # with its stop condition, batch, validation interval and decay resolved
    vocab: Vocab
    train_ids: torch.Tensor  # (N,) on the device
    val_ids: torch.Tensor
    val_windows: torch.Tensor | None  # (W, L + 1): what each validation reads of a long split; None: all of it
    val_reader: IdReader | None  # val_ids read with file reads (the start mix's fit reads it), None in memory
    batches: StatefulBatches | RandomWindows | RestartingStreams  # this rank's rows of the layout
    device: torch.device
    device_reason: str
    dtype: torch.dtype | None  # autocast; None = fp32
    dtype_reason: str
    run_dir: Path
    resume: Checkpoint | None = None  # the checkpoint to continue exactly
    base: Checkpoint | None = None  # fine-tuning: the model whose weights start the run
    parent: dict[str, Any] | None = None  # {"path", "added_chars"} of the base model
    sizing: dict[str, Any] | None = None  # {"fields", "reason"} when charrnn.training.sizing chose them
    probe_s: float = 0.0  # seconds the sizing probe took: they count against a time budget

    def summary(self) -> dict[str, Any]:
        """What a dry run returns: the decisions, no figures."""
        return {"run_dir": str(self.run_dir), "dry_run": True, "model": asdict(self.model_config),
                "train": asdict(self.config), "sizing": self.sizing, "device": str(self.device),
                "dtype": dtype_name(self.dtype), "train_chars": len(self.train_ids)}

    def corpus_record(self) -> dict[str, Any]:
        corpus = self.corpus
        return {"name": corpus.name, "sources": [str(s) for s in corpus.sources], "sha256": corpus.sha256,
                "chars": len(self.train_ids) + len(self.val_ids)}

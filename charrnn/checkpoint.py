"""One self-contained checkpoint file: plain dicts of tensors and primitives.

Layout (format_version 1)::

    format            "charrnn-checkpoint"
    format_version    1
    charrnn_version   version that wrote it
    model_config      dict of ModelConfig fields
    vocab             str, the sorted vocabulary
    model             state_dict of CharRNN (with --ema-decay: the averaged weights), with
                      start_state, the learned start state (zeros when an older file lacks it)
    train_weights     the raw training weights, with --ema-decay only (resume continues them)
    ema_updates       how many updates the average has had, with --ema-decay only
    optimizer         AdamW state_dict (training checkpoints)
    train_config      dict of TrainConfig fields, as resolved
    progress          {step, epoch, batch, elapsed_s, chars_seen, best_val_loss, val_loss}
    carried_state     list of (L, B, H) tensors: the stateful-training state at `batch`
    cursors           (B,) positions of the streams, with --stream-restart only
    start_mix         {keys, counts, weights}: the k-gram tables and mixing weights of
                      charrnn.startmix (absent when trained without it: the network alone)
    rng               {"torch": ByteTensor, "windows": ByteTensor, "cuda": [ByteTensor]}
    corpus            {name, sources, sha256, chars}

It loads with `torch.load(path, weights_only=True)` (no pickled classes) and is
written to a temporary file that is fsynced and `os.replace`d, so a kill at any
instant leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from charrnn import __version__
from charrnn.config import ModelConfig, build
from charrnn.data import Vocab
from charrnn.errors import CharRNNError, CheckpointError
from charrnn.celltypes import CELL_TYPES
from charrnn.model import CharRNN
from charrnn.startmix import StartMix

FORMAT = "charrnn-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("model_config", "vocab", "model")


@dataclass
class Checkpoint:
    """What one checkpoint file holds (the layout above), typed: built by the trainer
    (Trainer.payload), written by `save` as the plain dict above, read back by `load`
    after validation. Only model_config, vocab and model are needed for inference."""

    model_config: dict[str, Any]
    vocab: str
    model: dict[str, torch.Tensor]  # the weights inference uses (averaged with --ema-decay)
    train_config: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    corpus: dict[str, Any] = field(default_factory=dict)
    carried_state: list[torch.Tensor] = field(default_factory=list)
    train_weights: dict[str, torch.Tensor] | None = None  # --ema-decay: the raw weights training continues
    ema_updates: int | None = None
    cursors: torch.Tensor | None = None  # --stream-restart: the streams' positions
    parent: dict[str, Any] | None = None  # fine-tuned: {"path", "added_chars"} of the base model
    start_mix: dict[str, Any] | None = None  # the k-gram mixed into a fresh read's first predictions
    path: str = ""  # the file it was read from (not stored)

    def to_dict(self) -> dict[str, Any]:
        """The stored form: the fields that hold something, beside the format header."""
        stored = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "path"}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "charrnn_version": __version__,
                **{k: v for k, v in stored.items() if v is not None}}

    @classmethod
    def from_dict(cls, payload: dict[str, Any], path: str = "") -> "Checkpoint":
        known = {f.name for f in fields(cls)} - {"path"}
        return cls(**{k: v for k, v in payload.items() if k in known}, path=path)


def save(path: str | Path, payload: Checkpoint | dict[str, Any]) -> None:
    """Write a checkpoint to path atomically (temp file in the same directory, fsync, rename)."""
    if isinstance(payload, Checkpoint):
        payload = payload.to_dict()
    else:
        payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "charrnn_version": __version__, **payload}
    atomic_write(path, lambda handle: torch.save(payload, handle))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Every file a run writes goes through here: written to a temporary file in the same
    directory, fsynced and renamed over `path`, so a kill or a full disk at any instant
    leaves the old file or the new one, never half of one. A full disk or a read-only
    file system is a CheckpointError naming the file and saying what is left."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        problem = write_problem(err)
        if problem is None:
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise CheckpointError(f"could not write {path}: {problem}; {kept}") from None
    _fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def append_line(path: str | Path, line: str) -> None:
    """Append one line (metrics.jsonl); a full disk is named as for atomic writes."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    except OSError as err:
        problem = write_problem(err)
        if problem is None:
            raise
        raise CheckpointError(f"could not write {path}: {problem}; its earlier lines are intact") from None


def write_problem(err: BaseException) -> str | None:
    """A user's words for a failed write, or None when it is not one of the disk's doing."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (free some space, then charrnn train --resume)"
    if isinstance(err, OSError) and err.errno == errno.EROFS:
        return "the file system is read-only (choose another --out)"
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (choose another --out)"
    # torch.save reports a short write from its C++ writer as a RuntimeError.
    if isinstance(err, RuntimeError) and any(s in str(err) for s in ("unexpected pos", "file write failed")):
        return "the disk is full (free some space, then charrnn train --resume)"
    return None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its best.pt, else last.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"run directory {path} has no best.pt or last.pt; train first")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give a .pt file or a run directory")
    return path


def latest_run(root: str | Path = "runs") -> Path:
    """The run directory under root whose checkpoint was written most recently."""
    candidates = [p for p in Path(root).glob("*/*.pt") if p.name in ("best.pt", "last.pt")]
    if not candidates:
        raise CheckpointError(f"no trained run found under {root}/; train one first or pass --checkpoint")
    return max(candidates, key=lambda p: p.stat().st_mtime).parent


def load(path: str | Path) -> Checkpoint:
    """Load and check a checkpoint on the CPU, whatever device wrote it."""
    path = resolve(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({blocked.group(1)})" if blocked else ""
        raise CheckpointError(
            f"{path} holds Python code or objects{what} that a charrnn checkpoint never contains; "
            "it was not loaded. Use a checkpoint written by charrnn train"
        ) from None
    except Exception as err:  # torch raises many kinds for truncated or foreign files
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
        reason = text.splitlines()[0][:120] if text else type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable charrnn checkpoint (truncated or another kind of file: {reason})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a charrnn checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}, but this charrnn ({__version__}) reads "
            f"format {FORMAT_VERSION}; use the charrnn version that wrote it "
            f"({payload.get('charrnn_version', 'unknown')})"
        )
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"{path} is missing {', '.join(missing)}; it is damaged")
    _upgrade(payload)
    problem = _structure_problem(payload)
    if problem:
        raise CheckpointError(f"{path} is damaged or not a charrnn checkpoint: {problem}")
    return Checkpoint.from_dict(payload, str(path))


def _structure_problem(payload: dict[str, Any]) -> str | None:
    """What is wrong with a loaded checkpoint's config, vocabulary and weights, or None.

    Checked once, here, so that nothing later meets a wrong type or shape."""
    config = payload["model_config"]
    if not isinstance(config, dict):
        return "its model config is not a table"
    try:
        model_config = build(ModelConfig, config)
    except CharRNNError as err:
        return f"its model config is invalid ({err})"
    vocab = payload["vocab"]
    if not isinstance(vocab, str) or not vocab:
        return "its vocabulary is not a string of characters"
    try:
        Vocab(vocab)
    except CharRNNError:
        return "its vocabulary is not a sorted string of distinct characters"
    expected = {k: tuple(v.shape) for k, v in CharRNN(model_config, len(vocab)).state_dict().items()}
    for part in ("model", "train_weights"):
        weights = payload.get(part)
        if weights is None and part == "train_weights":
            continue
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            return f"its {part} weights are not a table of tensors"
        lacking = sorted(expected.keys() - weights.keys())
        extra = sorted(weights.keys() - expected.keys())
        wrong = [k for k in expected.keys() & weights.keys() if tuple(weights[k].shape) != expected[k]]
        if lacking or extra or wrong:
            details = [f"{len(lacking)} missing (first {lacking[0]})" if lacking else "",
                       f"{len(extra)} unexpected (first {extra[0]})" if extra else "",
                       f"{len(wrong)} of the wrong shape (first {wrong[0]}: {tuple(weights[wrong[0]].shape)}, "
                       f"config says {expected[wrong[0]]})" if wrong else ""]
            return f"its {part} weights do not fit its config: " + ", ".join(d for d in details if d)
    if payload.get("start_mix") is not None:
        return StartMix.problem(payload["start_mix"], len(vocab))
    return None


def _upgrade(payload: dict[str, Any]) -> None:
    """Fill what older checkpoints of the same format lack, with the values that mean
    what they did then: no learned start state is the all-zero one."""
    weights, config = payload["model"], payload["model_config"]
    if isinstance(weights, dict) and isinstance(config, dict) and "start_state" not in weights:
        cell = CELL_TYPES.get(config.get("cell", "lstm"))
        count = cell.state_size if cell else 2
        shape = (count, config.get("num_layers", 2), config.get("hidden_size", 512))
        weights["start_state"] = torch.zeros(shape)


def restore_model(payload: Checkpoint) -> tuple[CharRNN, Vocab]:
    """The model (eval mode, CPU) and vocabulary stored in a loaded checkpoint."""
    config = build(ModelConfig, payload.model_config)
    vocab = Vocab(payload.vocab)
    model = CharRNN(config, len(vocab))
    try:
        model.load_state_dict(payload.model)
    except RuntimeError as err:
        raise CheckpointError(f"{payload.path or 'checkpoint'} has weights that do not fit its config: {err}") from None
    if payload.start_mix is not None:
        model.start_mix = StartMix.from_state(payload.start_mix, len(vocab))
    model.eval()
    return model, vocab

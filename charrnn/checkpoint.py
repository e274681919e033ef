"""One self-contained checkpoint file: plain dicts of tensors and primitives.

Layout (format_version 1)::

    format            "charrnn-checkpoint"
    format_version    1
    charrnn_version   version that wrote it
    model_config      dict of ModelConfig fields
    vocab             str, the sorted vocabulary
    model             state_dict of CharRNN
    optimizer         AdamW state_dict (training checkpoints)
    train_config      dict of TrainConfig fields, as resolved
    progress          {step, epoch, batch, elapsed_s, chars_seen, best_val_loss, val_loss}
    carried_state     list of (L, B, H) tensors: the stateful-training state at `batch`
    rng               {"torch": ByteTensor, "windows": ByteTensor, "cuda": [ByteTensor]}
    corpus            {name, sources, sha256, chars}

It loads with `torch.load(path, weights_only=True)` (no pickled classes) and is
written to a temporary file that is fsynced and `os.replace`d, so a kill at any
instant leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from charrnn import __version__
from charrnn.config import ModelConfig, build
from charrnn.data import Vocab
from charrnn.errors import CheckpointError
from charrnn.model import LSTM_CELLS, CharRNN

FORMAT = "charrnn-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("model_config", "vocab", "model")


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write payload to path atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "charrnn_version": __version__, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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


def load(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint on the CPU, whatever device wrote it."""
    path = resolve(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for truncated or foreign files
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
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
    payload["path"] = str(path)
    return payload


def _upgrade(payload: dict[str, Any]) -> None:
    """Fill what older checkpoints of the same format lack, with the values that mean
    what they did then: no learned start state is the all-zero one."""
    weights, config = payload["model"], payload["model_config"]
    if isinstance(weights, dict) and isinstance(config, dict) and "start_state" not in weights:
        count = 2 if config.get("cell", "lstm") in LSTM_CELLS else 1
        shape = (count, config.get("num_layers", 2), config.get("hidden_size", 512))
        weights["start_state"] = torch.zeros(shape)


def restore_model(payload: dict[str, Any]) -> tuple[CharRNN, Vocab]:
    """The model (eval mode, CPU) and vocabulary stored in a loaded checkpoint."""
    config = build(ModelConfig, payload["model_config"])
    vocab = Vocab(payload["vocab"])
    model = CharRNN(config, len(vocab))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{payload.get('path', 'checkpoint')} has weights that do not fit its config: {err}") from None
    model.eval()
    return model, vocab

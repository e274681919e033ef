"""The checkpoint format: one self-contained file of plain dicts of tensors and primitives.

A checkpoint is the `Checkpoint` below written as a dict, beside a header (`format`
"charrnn-checkpoint", `format_version` 1, `charrnn_version`); its fields, each commented
where it is declared, are the layout. It loads with `torch.load(path, weights_only=True)`
(no pickled classes) and is written through charrnn.atomic, so a kill at any instant
leaves the old file or the new one. `load` checks a file before anything reads it and
names what it met: an unreadable file, a cut-short one, one holding Python code, one
whose weights do not fit its config.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from charrnn.atomic import atomic_write
from charrnn.celltypes import CELL_TYPES
from charrnn.config import ModelConfig, build
from charrnn.data.text import Vocab
from charrnn.errors import CharRNNError, CheckpointError
from charrnn.model.network import CharRNN
from charrnn.model.startmix import StartMix
from charrnn.version import __version__

FORMAT = "charrnn-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("model_config", "vocab", "model")


@dataclass
class Checkpoint:
    """What one checkpoint file holds, typed: built by training
    (charrnn.training.trainstate.TrainState.checkpoint), written by `save` as the plain dict above, read back by `load`
    after validation. Only model_config, vocab and model are needed for inference."""

    model_config: dict[str, Any]  # the ModelConfig's fields
    vocab: str  # the sorted vocabulary
    # CharRNN's state_dict, start_state (the learned start state) among it; with
    # --ema-decay the averaged weights, which inference uses.
    model: dict[str, torch.Tensor]
    train_config: dict[str, Any] = field(default_factory=dict)  # the TrainConfig's fields, as resolved
    # charrnn.training.trainstate.Progress: step, epoch, batch, elapsed_s, chars_seen, best_val_loss,
    # val_loss, window_loss_sum, window_steps
    progress: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None  # AdamW's state_dict
    rng: dict[str, Any] = field(default_factory=dict)  # {"torch", "windows", "cuda"?}: generator states
    corpus: dict[str, Any] = field(default_factory=dict)  # {name, sources, sha256, chars}
    carried_state: list[torch.Tensor] = field(default_factory=list)  # stateful training: (L, B, H) each
    train_weights: dict[str, torch.Tensor] | None = None  # --ema-decay: the raw weights training continues
    ema_updates: int | None = None  # --ema-decay: the updates the average has had
    cursors: torch.Tensor | None = None  # --stream-restart: the (B,) streams' positions
    parent: dict[str, Any] | None = None  # fine-tuned: {"path", "added_chars"} of the base model
    # The start mix (charrnn.model.startmix): a decoding and scoring prior over the first
    # predictions read from the start state, not part of the network; StartMix.state().
    start_mix: dict[str, Any] | None = None
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
    except Exception as err:  # torch raises many kinds for damaged or foreign files
        raise CheckpointError(_unreadable(path, err)) from None
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


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive
# A bare pickle (torch.save's legacy format) opens with PROTO and its protocol, 2 to 5.
PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _unreadable(path: Path, err: Exception) -> str:
    """Why torch.load refused a file, in one line: it holds code or objects (a pickle, or an
    archive whose pickle names a global), it is an archive cut short or damaged, or it is
    no PyTorch file at all."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    with open(path, "rb") as handle:
        head = handle.read(4)
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    if blocked or (head.startswith(PICKLE_PROTOCOLS) and isinstance(err, pickle.UnpicklingError)):
        what = f" ({blocked.group(1)})" if blocked else ""
        return (f"{path} holds Python code or objects{what} that a charrnn checkpoint never contains; "
                "it was not loaded. Use a checkpoint written by charrnn train")
    if head == ZIP_MAGIC:
        reason = text.splitlines()[0][:120] if text else type(err).__name__
        return (f"{path} is unreadable: a PyTorch archive cut short or damaged ({reason}); "
                "use last.pt or best.pt beside it, or an intact copy")
    return (f"{path} is unreadable: not a PyTorch checkpoint at all (random or foreign bytes); "
            "give a .pt file written by charrnn train")


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
    """The network (eval mode, CPU) and vocabulary stored in a loaded checkpoint."""
    config = build(ModelConfig, payload.model_config)
    vocab = Vocab(payload.vocab)
    model = CharRNN(config, len(vocab))
    try:
        model.load_state_dict(payload.model)
    except RuntimeError as err:
        raise CheckpointError(f"{payload.path or 'checkpoint'} has weights that do not fit its config: {err}") from None
    model.eval()
    return model, vocab


def restore_prior(payload: Checkpoint) -> StartMix | None:
    """The start mix stored beside the network, or None (trained without it)."""
    return StartMix.from_state(payload.start_mix, len(payload.vocab)) if payload.start_mix is not None else None

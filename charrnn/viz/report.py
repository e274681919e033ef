"""`charrnn viz`: one self-contained HTML page of what a trained model learned.

The numbers come from charrnn.viz.analysis; this module gathers them with the run's history
(metrics.jsonl, samples.jsonl) into one JSON object and inlines it, with the page's own
script and style (charrnn/viz/report.html), into a single file that opens from disk with no
network. Activations travel as int8 (x127) in base64: 1.33 bytes per unit per character,
which is what drives the size (a 2x512 model over 3,000 characters: ~4 MB).
"""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch

from charrnn.celltypes import CELL_TYPES
from charrnn.data.text import Vocab
from charrnn.errors import DataError
from charrnn.infer.sample import SampleSettings, sample_text
from charrnn.model.network import CharRNN, count_parameters
from charrnn.model.startmix import StartMix
from charrnn.store import rundir
from charrnn.viz import analysis


@dataclass(frozen=True)
class ReportSource:
    """Where the page's text and checkpoint came from, said on the page."""

    checkpoint: str
    text: str  # a description: "validation split of ... (last 10%)" or a file name
    run_dir: Path | None  # None: a .pt alone, no training history


def read_history(run_dir: Path | None) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl and samples.jsonl records (either may be missing; damaged lines are skipped)."""
    if run_dir is None:
        return [], []
    return tuple([record for _, record in rundir.records(run_dir / name, strict=False)] for name in rundir.JOURNALS)


def build(model: CharRNN, vocab: Vocab, ids: list[int], source: ReportSource, *, prior: StartMix | None = None,
          seed: int = 1, temperature: float = 0.8, sample_length: int = 400,
          progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Everything the page shows, as one JSON-able dict. prior: the start mix, read as
    `charrnn eval` and `charrnn sample` read it (charrnn.model.startmix)."""
    if len(ids) < 2:
        raise DataError("the text has fewer than 2 characters the model knows; give a longer --text")
    text = vocab.decode(ids)
    started = time.perf_counter()
    progress(f"reading {len(ids):,} characters")
    found = analysis.trace(model, ids, prior)
    progress("scoring units against the text's features")
    findings = analysis.feature_scores(found.activations, text, seed=seed)
    sample_text, sample_trace = _sample(model, vocab, prior, seed, temperature, sample_length)
    metrics, samples = read_history(source.run_dir)
    config = model.config
    return {
        "source": {"checkpoint": source.checkpoint, "text": source.text, "run_dir": str(source.run_dir or "")},
        "model": {**asdict(config), "parameters": count_parameters(model), "vocab_size": len(vocab)},
        "text": text,
        "bits": [_round(v / math.log(2)) for v in found.loss.tolist()],
        "top": [[[vocab.chars[i], round(p, 4)] for i, p in zip(ids_, probs) if i >= 0]
                for ids_, probs in zip(found.top_ids.tolist(), found.top_probs.tolist())],
        "classes": analysis.loss_by_class(text, found.loss),
        "layers": [{"units": a.shape[1], "activations": _int8(a)} for a in found.activations],
        "activation": "tanh(c), the cell state" if CELL_TYPES[config.cell].has_cell_state else "h, the hidden state",
        "findings": [asdict(f) | {"auroc": analysis.auroc_of(f.score) if f.binary else None} for f in findings],
        "saturation": [{name: {k: [round(x, 4) for x in v.tolist()] for k, v in parts.items()}
                        for name, parts in layer.items()} for layer in analysis.saturation(found.gates)],
        "sample": {"text": sample_text, "prob": [_round(math.exp(-v)) for v in sample_trace.loss.tolist()],
                   "seed": seed, "temperature": temperature},
        "metrics": metrics,
        "samples": samples,
        "analysis_s": round(time.perf_counter() - started, 2),
    }


def _sample(model: CharRNN, vocab: Vocab, prior: StartMix | None, seed: int, temperature: float, length: int):
    """A fresh sample from the start state and the model's own trace of it (its probabilities)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    settings = SampleSettings(length=length, temperature=temperature)
    text = sample_text(model, vocab, settings, generator, device, prior=prior)
    ids, _ = vocab.encode(text, "skip")
    return text, analysis.trace(model, ids.tolist(), prior)


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


def _int8(activations: torch.Tensor) -> str:
    """(N, H) values in [-1, 1] -> base64 of int8 x127, row by row (character by character)."""
    quantised = (activations.clamp(-1, 1) * 127).round().to(torch.int8).contiguous()
    return base64.b64encode(bytes(quantised.view(torch.uint8).flatten().tolist())).decode("ascii")


def render(data: dict[str, Any]) -> str:
    """The page: the template with the data inlined (safe inside <script>)."""
    template = resources.files("charrnn.viz").joinpath("report.html").read_text(encoding="utf-8")
    payload = json.dumps(data, ensure_ascii=True, allow_nan=False).replace("</", "<\\/")
    return template.replace("/*DATA*/null", payload)

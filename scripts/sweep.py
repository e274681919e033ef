#!/usr/bin/env python3
"""Compare training recipes at equal steps: one change at a time from a base recipe.

    python scripts/sweep.py prose --steps 500 \\
        --base "hidden_size=256 embedding_size=256 dropout=0 stateless=true seq_len=100 learning_rate=2e-3 \\
                min_lr_ratio=1 warmup_steps=0 weight_decay=0 grad_clip=5 forget_bias=0" \\
        "A:" "D:embedding_size=64" "E:learning_rate=3e-3 warmup_steps=100 min_lr_ratio=0.05 decay_frac=1"

Each variant is LABEL:key=value ... (ModelConfig or TrainConfig fields) applied on top of
--base. Every run trains charrnn's own Trainer for --steps steps on the corpus (a path or
a name of scripts/yardstick.py) and prints its validation loss two ways: charrnn's eval
(state carried along 64 streams) and the plain loop's (1000-character chunks, each from
the start state). Steps, not seconds: the figures do not depend on the machine's speed,
so a sweep may share the machine (its seconds column then means little).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from charrnn.config import ModelConfig, TrainConfig, build, tomllib  # noqa: E402
from charrnn.data.text import read_corpus  # noqa: E402
from charrnn.device import autocast  # noqa: E402
from charrnn.infer.evaluate import evaluate  # noqa: E402
from charrnn.training.run import trainer_for  # noqa: E402
from yardstick import corpus_path  # noqa: E402


def parse(assignments: str) -> dict:
    """'a=1 b=true c=x' -> {'a': 1, 'b': True, 'c': 'x'} (values read as TOML, else strings)."""
    values = {}
    for item in assignments.split():
        key, _, raw = item.partition("=")
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw
    return values


@torch.no_grad()
def chunk_loss(model, ids: torch.Tensor, device, dtype, chunk: int = 1000) -> float:
    """The plain loop's protocol: 1000-character chunks, each read from the start state."""
    ids = ids.long().to(device)
    count = (len(ids) - 1) // chunk
    x = ids[: count * chunk].view(count, chunk)
    y = ids[1 : count * chunk + 1].view(count, chunk)
    total = 0.0
    for start in range(0, count, 64):
        with autocast(device, dtype):
            logits, _ = model(x[start : start + 64])
        total += F.cross_entropy(logits.float().flatten(0, 1), y[start : start + 64].flatten(), reduction="sum").item()
    return total / y.numel()


def run(corpus, settings: dict, steps: int) -> dict:
    model_keys = set(ModelConfig.__dataclass_fields__)
    model_config = build(ModelConfig, {k: v for k, v in settings.items() if k in model_keys})
    train_config = build(TrainConfig, {"eval_every": 10**9, "sample_length": 0, "steps": steps,
                                       **{k: v for k, v in settings.items() if k not in model_keys}})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(corpus, model_config, train_config, Path(tmp) / "run")
        started = time.perf_counter()
        trainer.run()
        seconds = time.perf_counter() - started
    model = trainer.state.model.eval()
    carried = evaluate(model, trainer.plan.val_ids, trainer.device, trainer.dtype).loss
    return {"carried": carried, "chunks": chunk_loss(model, trainer.plan.val_ids, trainer.device, trainer.dtype),
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", help="a path, or shakespeare, pydocs, pysource, prose, german")
    parser.add_argument("variants", nargs="+", help="LABEL:key=value ...")
    parser.add_argument("--base", default="", help="key=value ... applied to every variant")
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    corpus = read_corpus([str(corpus_path(args.corpus))])
    base = parse(args.base)
    print(f"{'variant':32s} {'carried':>8s} {'chunks':>8s} {'seconds':>8s}", flush=True)
    for variant in args.variants:
        label, _, changes = variant.partition(":")
        result = run(corpus, {**base, **parse(changes)}, args.steps)
        print(f"{label[:32]:32s} {result['carried']:8.4f} {result['chunks']:8.4f} {result['seconds']:8.0f}", flush=True)
        print(json.dumps({"label": label, "changes": changes, **result}), file=sys.stderr)


if __name__ == "__main__":
    main()

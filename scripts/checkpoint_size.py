#!/usr/bin/env python3
"""What a checkpoint's bytes are spent on: the file, and each field's tensors.

    python scripts/checkpoint_size.py runs/tinyshakespeare/best.pt runs/other [--json]

For each checkpoint (a .pt or a run directory: its best.pt) prints the file's size and
the bytes of the tensors in each field (model, optimizer, start_mix, ...), with the
start mix's share of the file: what the mix costs on disk and in every save.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from charrnn.store import checkpoint  # noqa: E402


def tensor_bytes(value) -> int:
    """Bytes of every tensor inside value (dicts and lists walked)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def sizes(path: Path) -> dict:
    path = checkpoint.resolve(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    fields = {key: tensor_bytes(value) for key, value in payload.items() if tensor_bytes(value)}
    file_bytes = path.stat().st_size
    mix = payload.get("start_mix")
    grams = sum(len(t) for t in (mix.get("chars") or mix.get("keys"))) if mix else 0
    return {"path": str(path), "file_bytes": file_bytes, "fields": fields, "start_mix_grams": grams,
            "start_mix_share": fields.get("start_mix", 0) / file_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for path in args.checkpoints:
        found = sizes(path)
        if args.json:
            print(json.dumps(found))
            continue
        parts = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in found["fields"].items())
        print(f"{found['path']}: {found['file_bytes'] / 1e6:.2f} MB ({parts}); start mix "
              f"{found['start_mix_grams']:,} n-grams, {found['start_mix_share']:.0%} of the file")


if __name__ == "__main__":
    main()

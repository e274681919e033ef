#!/usr/bin/env python3
"""charrnn's defaults against a plain 40-line training loop, at equal wall time.

    python scripts/yardstick.py shakespeare prose --time 2m,5m
    python scripts/yardstick.py my_corpus.txt --time 10m --charrnn-args "--hidden-size 256"
    python scripts/yardstick.py pydocs --time 2m --only loop      # the loop alone

Corpora: a path, or one of the named texts: shakespeare (../shared/data/tinyshakespeare.txt),
pydocs, pysource, prose and german (built by scripts/corpora.py into /tmp/charrnn-corpora;
german only where the machine has German manual pages).

The plain loop is what a tutorial writes: embedding 256 -> 2x256 nn.LSTM -> linear, Adam
at a constant 2e-3, no dropout, random 100-character windows, batch 64, gradient norm
clipped at 5, fp32. It validates every 200 steps (and at the end) on the last 10 % of the
text, scored from a zero state in 1000-character chunks, and keeps its best figure; its
validations count against its budget, as charrnn's do. charrnn runs as a user runs it,
`charrnn train CORPUS --time T` in a subprocess (plus --charrnn-args), and its figure is
the best validation loss it reports: `charrnn eval` of the same last 10 %.

Run it on an otherwise idle machine: the two sides run one after the other, and a wall-clock
budget on a busy machine buys fewer steps. Each row prints the loop's chars/s, the figure
that says how fast the machine was that day.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from charrnn.config import parse_duration  # noqa: E402
from charrnn.data.text import Vocab, read_corpus, split  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
NAMED = ("shakespeare", "pydocs", "pysource", "prose", "german")


def corpus_path(name: str) -> Path:
    if name == "shakespeare":
        return SHAKESPEARE
    if name in NAMED:
        import corpora

        built = corpora.build("/tmp/charrnn-corpora", (name,))
        if name not in built:
            raise SystemExit(f"{name}: not built here: no German manual pages under {corpora.MAN_PAGES}, or no man-db")
        return built[name]
    return Path(name)


class PlainLSTM(nn.Module):
    def __init__(self, vocab_size: int, layers: int = 2, hidden: int = 256):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, 256)
        self.lstm = nn.LSTM(256, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x, state=None):
        out, state = self.lstm(self.embedding(x), state)
        return self.head(out), state


@torch.no_grad()
def chunked_loss(model: PlainLSTM, ids: torch.Tensor, chunk: int = 1000, batch: int = 64) -> float:
    """Mean loss over the text cut into chunk-character pieces, each read from a zero state."""
    model.eval()
    ids = ids.long()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    starts = list(range(0, len(ids) - 1, chunk))
    full = [s for s in starts if s + chunk + 1 <= len(ids)]
    for i in range(0, len(full), batch):
        rows = torch.stack([ids[s : s + chunk + 1] for s in full[i : i + batch]]).to(device)
        logits, _ = model(rows[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
        count += rows[:, 1:].numel()
    rest = [s for s in starts if s not in set(full)]
    for s in rest:  # the short last piece
        piece = ids[s:].to(device)
        logits, _ = model(piece[None, :-1])
        total += F.cross_entropy(logits[0], piece[1:], reduction="sum").item()
        count += len(piece) - 1
    model.train()
    return total / count


def plain_loop(path: Path, seconds: float, seed: int = 1337, device: str = "cpu", size: str = "2x256") -> dict:
    torch.manual_seed(seed)
    corpus = read_corpus([str(path)])
    vocab = Vocab.from_data(corpus)
    train_ids, val_ids = split(vocab.encode_data(corpus), 0.1)
    train_ids = train_ids.long().to(device)
    layers, hidden = (int(n) for n in size.split("x"))
    model = PlainLSTM(len(vocab), layers, hidden).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    best, step, train_time = float("inf"), 0, 0.0
    start = time.perf_counter()
    offsets = torch.arange(101, device=device)
    while True:
        t0 = time.perf_counter()
        starts = torch.randint(0, len(train_ids) - 101, (64, 1), device=device)
        window = train_ids[starts + offsets]
        logits, _ = model(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        sync()
        step += 1
        train_time += time.perf_counter() - t0
        out_of_time = time.perf_counter() - start >= seconds
        if step % 200 == 0 or out_of_time:
            best = min(best, chunked_loss(model, val_ids))
        if out_of_time:
            break
    return {"best_val_loss": best, "steps": step, "chars_per_s": step * 64 * 100 / train_time,
            "elapsed_s": time.perf_counter() - start}


def charrnn_run(path: Path, budget: str, extra: list[str], keep: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = keep / f"{path.stem}-{budget}" if keep else Path(tmp) / "run"
        cmd = [sys.executable, "-m", "charrnn", "train", str(path), "--time", budget, "--out", str(out),
               "--quiet", "--json", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"charrnn failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        setup = [line for line in done.stderr.splitlines() if line.startswith(("model:", "size:", "data:"))]
    rates = [r["chars_per_s"] for r in records if r["chars_per_s"] == r["chars_per_s"]]
    return {"best_val_loss": summary["best_val_loss"], "steps": summary["steps"],
            "chars_per_s": sum(rates) / len(rates) if rates else float("nan"), "setup": setup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpora", nargs="+", help=f"paths or names: {', '.join(NAMED)}")
    parser.add_argument("--time", default="5m", help="comma-separated budgets, e.g. 2m,5m,10m")
    parser.add_argument("--only", choices=("loop", "charrnn"), help="run one side only")
    parser.add_argument("--charrnn-args", default="", help="extra flags for charrnn train")
    parser.add_argument("--json", action="store_true", help="one JSON line per row as well")
    parser.add_argument("--keep", type=Path, help="keep charrnn's run directories under this folder")
    parser.add_argument("--device", default="cpu", help="the loop's device (cpu, cuda); charrnn picks its own unless "
                        "--charrnn-args says --device")
    parser.add_argument("--loop-size", default="2x256", help="the loop's LAYERSxHIDDEN (2x256; 3x512 for a GPU)")
    args = parser.parse_args()
    extra = shlex.split(args.charrnn_args)
    print(f"{'corpus':12s} {'budget':>6s} | {'loop val':>8s} {'steps':>6s} {'chars/s':>8s} | "
          f"{'charrnn val':>11s} {'steps':>6s} {'chars/s':>8s} | {'ahead by':>8s}", flush=True)
    for name in args.corpora:
        path = corpus_path(name)
        for budget in args.time.split(","):
            seconds = parse_duration(budget)
            loop = plain_loop(path, seconds, device=args.device, size=args.loop_size) if args.only != "charrnn" else None
            ours = charrnn_run(path, budget, extra, args.keep) if args.only != "loop" else None
            row = {"corpus": name, "budget": budget, "loop": loop, "charrnn": ours,
                   "charrnn_args": args.charrnn_args}
            cells = [f"{name[:12]:12s} {budget:>6s}"]
            for side in (loop, ours):
                cells.append(f"{side['best_val_loss']:8.4f} {side['steps']:6d} {side['chars_per_s']:8.0f}"
                             if side else f"{'-':>8s} {'-':>6s} {'-':>8s}")
            gap = loop["best_val_loss"] - ours["best_val_loss"] if loop and ours else float("nan")
            print(" | ".join(cells) + f"    | {gap:+8.4f}", flush=True)
            if ours:
                for line in ours["setup"]:
                    print(f"    {line}", flush=True)
            if args.json:
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

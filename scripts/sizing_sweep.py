#!/usr/bin/env python3
"""The sweeps behind the sizing rule (charrnn.sizing): which width learns most in a time
budget, and how the best grows with the characters the budget can read.

    python scripts/sizing_sweep.py prose shakespeare --budgets 5m,20m --widths 256,384,512 --jobs 2
    python scripts/sizing_sweep.py --fit /tmp/charrnn-sizing/results.jsonl
    python scripts/sizing_sweep.py --choices 1MB.txt 10MB.txt 100MB.txt --budgets 1m,5m,20m,1h

A time budget is turned into steps before any run: each width's training speed is timed
once at the start (charrnn.sizing.probe_speed at the CPU's batch, with the machine to
itself), and a budget of T seconds becomes the steps that speed covers in 0.9 T, as
`charrnn train --time T` plans it. The runs themselves are then `charrnn train CORPUS
--steps S --hidden-size H` (every other setting the defaults' choice for those passes),
so their figures do not depend on how busy the machine is: --jobs runs several at once,
each on cores/jobs threads. Results go to a JSON-lines file, one line per run; a rerun
skips the runs already there.

--fit reads that file and, for each corpus and budget, takes the best width (a parabola
through the best and its two neighbours in log parameters, when the best is not at the
edge), then fits log N_best = a log D_best + c over all of them, D the characters the
best reads. It prints the exponent a (1 = a constant characters-per-parameter rule, as
Chinchilla's for transformers; below 1, bigger budgets want more characters per
parameter), its fit error, and the characters per parameter K(D) = D / N the fit implies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from charrnn import sizing  # noqa: E402
from charrnn.config import ModelConfig, TrainConfig, parse_duration  # noqa: E402
from charrnn.data import read_corpus  # noqa: E402
from charrnn.device import resolve_dtype  # noqa: E402
from yardstick import corpus_path  # noqa: E402

CPU = torch.device("cpu")


def speeds(widths: list[int], vocab_size: int, batch: int, seq_len: int) -> dict[int, float]:
    """Training chars/s of each width on this machine, as the sizing probe times them (bf16 where auto picks it)."""
    dtype, _ = resolve_dtype("auto", CPU, lstm=True)
    train = replace(TrainConfig(), batch_size=batch, seq_len=seq_len)
    return {h: sizing.probe_speed(replace(ModelConfig(), hidden_size=h), train, vocab_size, CPU, dtype, chars=64_000)
            for h in widths}


def run_one(corpus: Path, name: str, budget: str, hidden: int, steps: int, work: Path, threads: int) -> dict:
    out = work / f"{name}-{budget}-h{hidden}"
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "charrnn", "train", str(corpus), "--steps", str(steps),
                           "--hidden-size", str(hidden), "-o", str(out), "-q", "--sample-length", "0",
                           "--device", "cpu", "--json"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} {budget} h{hidden}: charrnn train failed:\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    size_line = next((line for line in done.stderr.splitlines() if line.startswith("size:")), "")
    model_line = next((line for line in done.stderr.splitlines() if line.startswith("model:")), "")
    return {"corpus": name, "budget": budget, "hidden": hidden, "steps": steps,
            "parameters": int(model_line.split(" parameters")[0].split(", ")[-1].replace(",", "")),
            "chars": steps * 16 * 100, "best_val_loss": summary["best_val_loss"],
            "last_val_loss": summary["val_loss"], "seconds": round(time.perf_counter() - started),
            "size": size_line.removeprefix("size: ")}


def sweep(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results.jsonl"
    done = {(r["corpus"], r["budget"], r["hidden"]) for r in read(results)} if results.exists() else set()
    widths = [int(w) for w in args.widths.split(",")]
    if args.speeds:
        speed = {int(k): float(v) for k, v in (item.split("=") for item in args.speeds.split(","))}
    else:
        vocab = len(read_corpus([str(corpus_path(args.corpora[0]))]).vocab)
        speed = speeds(widths, vocab, 16, 100)
    print("chars/s: " + ", ".join(f"{h}={s:.0f}" for h, s in speed.items()), flush=True)
    jobs = []
    for name in args.corpora:
        for budget in args.budgets.split(","):
            for hidden in widths:
                if (name, budget, hidden) in done:
                    continue
                steps = math.ceil(speed[hidden] * parse_duration(budget) * 0.9 / (16 * 100))
                jobs.append((corpus_path(name), name, budget, hidden, steps))
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        for record in pool.map(lambda job: run_one(*job, work, threads), jobs):
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    table(read(results))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(records: list[dict]) -> None:
    widths = sorted({r["hidden"] for r in records})
    print("| corpus | budget | " + " | ".join(f"2x{h}" for h in widths) + " | best |")
    print("| --- | --- | " + " | ".join("---:" for _ in widths) + " | --- |")
    for (name, budget), rows in sorted(groups(records).items(), key=lambda kv: (kv[0][0], parse_duration(kv[0][1]))):
        by_width = {r["hidden"]: r for r in rows}
        best = min(rows, key=lambda r: r["best_val_loss"])
        cells = []
        for h in widths:
            r = by_width.get(h)
            if r is None:
                cells.append("")
                continue
            text = f"{r['best_val_loss']:.4f} ({r['chars'] / r['parameters']:.0f} c/p)"
            cells.append(f"**{text}**" if r is best else text)
        print(f"| {name} | {budget} | " + " | ".join(cells) + f" | 2x{best['hidden']} |")


def groups(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        out.setdefault((r["corpus"], r["budget"]), []).append(r)
    return out


def best_point(rows: list[dict]) -> tuple[float, float]:
    """(parameters, characters) of the best width: a parabola in log N through the best
    and its neighbours, or the best measured one when it is at the edge of the sweep."""
    rows = sorted(rows, key=lambda r: r["parameters"])
    i = min(range(len(rows)), key=lambda k: rows[k]["best_val_loss"])
    if 0 < i < len(rows) - 1:
        xs = [math.log(rows[k]["parameters"]) for k in (i - 1, i, i + 1)]
        ys = [rows[k]["best_val_loss"] for k in (i - 1, i, i + 1)]
        ds = [math.log(rows[k]["chars"]) for k in (i - 1, i, i + 1)]
        # vertex of the parabola through three points
        denom = (xs[0] - xs[1]) * (xs[0] - xs[2]) * (xs[1] - xs[2])
        a = (xs[2] * (ys[1] - ys[0]) + xs[1] * (ys[0] - ys[2]) + xs[0] * (ys[2] - ys[1])) / denom
        b = (xs[2] ** 2 * (ys[0] - ys[1]) + xs[1] ** 2 * (ys[2] - ys[0]) + xs[0] ** 2 * (ys[1] - ys[2])) / denom
        x = min(max(-b / (2 * a), xs[0]), xs[2]) if a > 0 else xs[1]
        # the characters read at that size: log D is piecewise linear in log N between the widths
        j = 0 if x <= xs[1] else 1
        d = ds[j] + (ds[j + 1] - ds[j]) * (x - xs[j]) / (xs[j + 1] - xs[j])
        return math.exp(x), math.exp(d)
    return float(rows[i]["parameters"]), float(rows[i]["chars"])


def fit(records: list[dict]) -> None:
    points = []
    for (name, budget), rows in sorted(groups(records).items()):
        if len(rows) < 2:
            continue
        n, d = best_point(rows)
        points.append((name, budget, n, d))
        print(f"{name:12s} {budget:>4s}: best ~{n / 1e6:.2f}M parameters reading {d / 1e6:.1f}M characters "
              f"({d / n:.1f} per parameter)")
    xs = [math.log(d) for *_, d in points]
    ys = [math.log(n) for _, _, n, _ in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    c = my - a * mx
    residuals = [y - (a * x + c) for x, y in zip(xs, ys)]
    rms = math.sqrt(sum(r * r for r in residuals) / len(residuals))
    print(f"N_best = {math.exp(c):.3g} * D^{a:.3f}  (fit error: RMS {rms:.3f} in log N, a factor of "
          f"{math.exp(rms):.2f} in parameters; {len(points)} points)")
    for d in (1e6, 3e6, 1e7, 3e7, 1e8, 3e8):
        print(f"  D = {d / 1e6:6.0f}M characters: N = {math.exp(c) * d ** a / 1e6:6.2f}M, K = {d / (math.exp(c) * d ** a):5.1f}")


def choices(args) -> None:
    """What `charrnn train FILE --time T --dry-run` picks for each file and budget (its
    probe times this machine: run it alone)."""
    print("| text | " + " | ".join(args.budgets.split(",")) + " |")
    print("| --- | " + " | ".join("---" for _ in args.budgets.split(",")) + " |")
    for name in args.corpora:
        cells = []
        for budget in args.budgets.split(","):
            done = subprocess.run([sys.executable, "-m", "charrnn", "train", str(corpus_path(name)), "--time", budget,
                                   "--dry-run", "--json", "-q"], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            if done.returncode != 0:
                raise SystemExit(f"{name} {budget}: {done.stderr[-1000:]}")
            plan = json.loads(done.stdout)
            model, train = plan["model"], plan["train"]
            reason = plan["sizing"]["reason"]
            passes = reason.split(" passes over the text")[0].rsplit(", ", 1)[-1]
            read = reason.split("characters read")[0].rsplit("~", 1)[-1].strip()
            cells.append(f"2x{model['hidden_size']}, {read} read, {passes} passes, dropout {model['dropout']:g}"
                         + (f", weight drop {model['weight_drop']:g}" if model["weight_drop"] else "")
                         + (f", average {train['ema_decay']:g}" if train["ema_decay"] else ""))
            print(f"  {name} {budget}: " + next(line for line in done.stderr.splitlines() if line.startswith("size:")),
                  file=sys.stderr, flush=True)
        print(f"| {Path(name).name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpora", nargs="*", help="paths or names: shakespeare, pydocs, pysource, prose")
    parser.add_argument("--budgets", default="5m,20m", help="comma-separated time budgets")
    parser.add_argument("--widths", default="256,384,512", help="comma-separated widths (2 layers each)")
    parser.add_argument("--speeds", help="WIDTH=chars/s,... instead of timing them now")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each on cores/jobs threads)")
    parser.add_argument("--work", default="/tmp/charrnn-sizing", help="run directories and results.jsonl")
    parser.add_argument("--fit", type=Path, help="fit the rule to this results file (and print its table)")
    parser.add_argument("--choices", action="store_true", help="print what --dry-run picks for each corpus and budget")
    args = parser.parse_args()
    if args.choices:
        choices(args)
    elif args.fit:
        records = read(args.fit)
        table(records)
        fit(records)
    elif args.corpora:
        sweep(args)
    else:
        parser.error("give corpora to sweep, or --fit RESULTS")


if __name__ == "__main__":
    main()

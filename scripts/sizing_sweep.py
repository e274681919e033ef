#!/usr/bin/env python3
"""The sweeps behind the sizing rule (charrnn.training.sizing): which width learns most in a time
budget, and how the best grows with the characters the budget can read.

    python scripts/sizing_sweep.py prose shakespeare --budgets 5m,20m --widths 256,384,512 --jobs 2
    python scripts/sizing_sweep.py --fit /tmp/charrnn-sizing/results.jsonl
    python scripts/sizing_sweep.py --fit docs/sizing-pairs.jsonl     # the pairs charrnn's rule rests on
    python scripts/sizing_sweep.py --loss-fit docs/sizing-pairs.jsonl  # Chinchilla's L(N, D) by least squares
    python scripts/sizing_sweep.py --choices 1MB.txt 10MB.txt 100MB.txt --budgets 1m,5m,20m,1h

A time budget is turned into steps before any run: each width's training speed is timed
once at the start (charrnn.training.sizing.probe_speed at the CPU's batch, with the machine to
itself), and a budget of T seconds becomes the steps that speed covers in 0.9 T, as
`charrnn train --time T` plans it. The runs themselves are then `charrnn train CORPUS
--steps S --hidden-size H` (every other setting the defaults' choice for those passes),
so their figures do not depend on how busy the machine is: --jobs runs several at once,
each on cores/jobs threads. Results go to a JSON-lines file, one line per run; a rerun
skips the runs already there.

--fit reads that file and turns each pair of neighbouring widths into a bound on the
rule's K (characters per parameter) at the characters the wider one read: at most its
characters per parameter where it won, above where it lost. It prints the bounds and the
growths G for which some K0 (D / ANCHOR_CHARS) ** G satisfies them all (G = 0: a constant
K, as Chinchilla's rule for transformers), and where K0 may lie at charrnn's own G. A
sweep whose pairs disagree says so: the runs' noise is then larger than the rule's
resolution. It then reads each D as D_eff, repeats of a small text discounted (below), for
each R: whether the pairs' disagreement is that of a text read many times.

--loss-fit fits L = E_text + A N^-alpha + B D_eff^-beta to every run of the file by least
squares (D_eff: the characters read, repeats discounted) and prints its error and how
loosely the runs pin alpha and beta.
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
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from charrnn.training import sizing  # noqa: E402
from charrnn.config import ModelConfig, TrainConfig, parse_duration  # noqa: E402
from charrnn.data.text import Vocab, read_corpus  # noqa: E402
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
    data_line = next((line for line in done.stderr.splitlines() if line.startswith("data:")), "data: 0 train")
    return {"corpus": name, "budget": budget, "hidden": hidden, "steps": steps,
            "parameters": int(model_line.split(" parameters")[0].split(", ")[-1].replace(",", "")),
            "chars": steps * 16 * 100, "train_chars": int(data_line.split()[1].replace(",", "")),
            "best_val_loss": summary["best_val_loss"],
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
        vocab = len(Vocab.from_data(read_corpus([str(corpus_path(args.corpora[0]))])))
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
    for (name, budget, pair), rows in sorted(groups(records).items(), key=lambda kv: (kv[0][0], parse_duration(kv[0][1]), kv[0][2])):
        by_width = {r["hidden"]: r for r in rows}
        best = min(rows, key=lambda r: r["best_val_loss"])
        cells = []
        for h in widths:
            r = by_width.get(h)
            if r is None:
                cells.append("")
                continue
            per = f" ({r['chars'] / r['parameters']:.1f} c/p)" if r.get("chars") else ""
            text = f"{r['best_val_loss']:.4f}{per}"
            cells.append(f"**{text}**" if r is best else text)
        print(f"| {name} | {shown(budget, pair)} | " + " | ".join(cells) + f" | 2x{best['hidden']} |")


def groups(records: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """The runs by (corpus, budget, pair), the widths compared in the same time; "pair"
    names a second pair of the same text and budget (another day, another rule). Runs
    marked "unpaired" (the defaults' own yardstick runs) belong to no group."""
    out: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        if r.get("unpaired"):
            continue
        out.setdefault((r["corpus"], r["budget"], r.get("pair", "")), []).append(r)
    return out


def shown(budget: str, pair: str) -> str:
    """A group's budget as tables and bounds name it: with its pair, where it has one."""
    return f"{budget} ({pair})" if pair else budget


def bounds(records: list[dict], repeats: float = math.inf) -> list[tuple[str, float, float, bool]]:
    """What each pair of neighbouring widths says of K: where the wider one won, K at the
    characters it read is at most its characters per parameter (the rule should have taken
    it); where it lost, K there is above that (the rule should have stopped below it).
    repeats: read the characters as D_eff, repeats of the text discounted (`effective_chars`;
    inf: as read)."""
    out = []
    for (name, budget, pair), rows in sorted(groups(records).items()):
        rows = sorted(rows, key=lambda r: r["hidden"])
        for narrow, wide in zip(rows, rows[1:]):
            won = wide["best_val_loss"] < narrow["best_val_loss"]
            chars = effective_chars(wide["chars"], wide.get("train_chars") or math.inf, repeats)
            out.append((f"{name} {shown(budget, pair)} 2x{wide['hidden']} {'won' if won else 'lost'}",
                        float(chars), chars / wide["parameters"], won))
    return out


def k0_range(pairs: list[tuple[str, float, float, bool]], growth: float) -> tuple[float, float]:
    """The K0 for which K(D) = K0 (D / ANCHOR_CHARS) ** growth meets every bound: (above, at most]."""
    scale = [(d / sizing.ANCHOR_CHARS) ** growth for _, d, _, _ in pairs]
    low = max([k / f for (_, _, k, won), f in zip(pairs, scale) if not won], default=0.0)
    high = min([k / f for (_, _, k, won), f in zip(pairs, scale) if won], default=math.inf)
    return low, high


def feasible_growths(pairs: list[tuple[str, float, float, bool]]) -> list[float]:
    """The growths G (0 to 1.5, by 0.01) for which some K0 meets every bound."""
    def agrees(growth: float) -> bool:
        low, high = k0_range(pairs, growth)
        return low < high

    return [g for g in (step / 100 for step in range(151)) if agrees(g)]


def fit(records: list[dict]) -> None:
    """The growths G for which some K0 makes K(D) = K0 (D / ANCHOR_CHARS) ** G agree with
    every pair, and the K0 range at charrnn's own GROWTH; then the same with the characters
    read as D_eff, repeats discounted, for each R."""
    pairs = bounds(records)
    for label, d, k, won in pairs:
        print(f"  {label}: {d / 1e6:.2f}M characters, {k:.2f} per parameter -> K {'<=' if won else '>'} {k:.2f} there")
    feasible = feasible_growths(pairs)
    if not feasible:
        print("no K0 * D^G agrees with every pair: the measurements contradict each other (noise?)")
        return
    k0 = sizing.CHARS_PER_PARAMETER
    pinned = [g for g in feasible if round(k0_range(pairs, g)[0], 2) < k0 <= round(k0_range(pairs, g)[1], 2)]  # as printed
    low, high = k0_range(pairs, sizing.GROWTH)
    print(f"growths that agree with all {len(pairs)} pairs: {feasible[0]:.2f} to {feasible[-1]:.2f} (up to 1.5 tried); "
          f"with charrnn's K0 = {k0} at {sizing.ANCHOR_CHARS / 1e6:g}M characters: "
          + (f"{pinned[0]:.2f} to {pinned[-1]:.2f}" if pinned else "none")
          + f"; at charrnn's G = {sizing.GROWTH}, K0 may lie in ({low:.2f}, {high:.2f}]")
    for repeats in (r for r in REPEATS if not math.isinf(r)):  # inf: the lines above
        growths = feasible_growths(bounds(records, repeats))
        print(f"  D as D_eff, repeats discounted with R = {repeats:g}: "
              + (f"growths {growths[0]:.2f} to {growths[-1]:.2f}" if growths else "no growth agrees"))


REPEATS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, math.inf)  # R: passes after which repeats are worth ~nothing


def effective_chars(chars: float, unique: float, repeats: float) -> float:
    """Characters read, with repeats discounted as in Muennighoff et al. 2023 ("Scaling
    Data-Constrained Language Models"): the first pass counts in full, the k-th repeat
    exp(-k / R) of it, so the worth of reading a text over and over levels off at R + 1
    passes. R = inf: every character read counts (no discount)."""
    if chars <= unique or math.isinf(repeats):
        return chars
    return unique * (1 + repeats * (1 - math.exp(-(chars / unique - 1) / repeats)))


def measured(records: list[dict]) -> list[dict]:
    """The runs that say what they read: the characters, and the text's size."""
    return [r for r in records if r.get("chars") and r.get("train_chars")]


class LossFit(NamedTuple):
    rmse: float
    alpha: float
    beta: float
    repeats: float
    coef: list[float]  # E per text (sorted names), then A, then B
    worst: float  # the largest |residual|
    ordered: int  # measured pairs of widths whose order the fit gets right


def fit_losses(records: list[dict]) -> tuple[list[LossFit], list[str], int]:
    """Least squares over every run that says what it read: L = E_text + A (N/1M)^-alpha +
    B (D_eff/1M)^-beta (Chinchilla's parametric loss, an irreducible E per text, D_eff the
    characters read with repeats discounted), for each alpha, beta (0.05 to 1.5) and R on a
    grid, E, A and B solved for. The fits best first, the texts, and the number of pairs."""
    runs = measured(records)
    texts = sorted({r["corpus"] for r in runs})
    loss = torch.tensor([r["best_val_loss"] for r in runs], dtype=torch.float64)
    pairs = []
    for rows in groups(runs).values():
        rows = sorted(rows, key=lambda r: r["hidden"])
        pairs += [(runs.index(a), runs.index(b)) for a, b in zip(rows, rows[1:])]
    won = [bool(loss[a] < loss[b]) for a, b in pairs]
    fits = []
    grid = [step / 20 for step in range(1, 31)]
    text = F.one_hot(torch.tensor([texts.index(r["corpus"]) for r in runs]), len(texts)).double()
    n = torch.tensor([r["parameters"] / 1e6 for r in runs], dtype=torch.float64)
    for repeats in REPEATS:
        d = torch.tensor([effective_chars(r["chars"], r["train_chars"], repeats) / 1e6 for r in runs], dtype=torch.float64)
        for alpha in grid:
            for beta in grid:
                x = torch.cat([text, n.pow(-alpha).unsqueeze(1), d.pow(-beta).unsqueeze(1)], dim=1)
                coef = torch.linalg.lstsq(x, loss.unsqueeze(1)).solution.squeeze(1)
                if coef[-1] < 0 or coef[-2] < 0:
                    continue
                predicted = x @ coef
                residual = predicted - loss
                ordered = sum(bool(predicted[a] < predicted[b]) == w for (a, b), w in zip(pairs, won))
                fits.append(LossFit(float(residual.square().mean().sqrt()), alpha, beta, repeats, coef.tolist(),
                                    float(residual.abs().max()), ordered))
    fits.sort(key=lambda f: f.rmse)
    return fits, texts, len(pairs)


def loss_fit(records: list[dict]) -> None:
    """Prints the best fit, every fit within 10 % of its error (how loosely the runs pin
    the exponents), and how many measured pairs they order right."""
    fits, texts, pairs = fit_losses(records)
    best = fits[0]
    print(f"{len(measured(records))} runs on {len(texts)} texts, {pairs} pairs; the least-squares fit:")
    print(f"  L = E + {best.coef[-2]:.3f} (N/1M)^-{best.alpha:.2f} + {best.coef[-1]:.3f} (D_eff/1M)^-{best.beta:.2f}, "
          f"R = {best.repeats:g}; E: " + ", ".join(f"{t} {e:.3f}" for t, e in zip(texts, best.coef)))
    print(f"  fit error: RMSE {best.rmse:.4f} nats, largest residual {best.worst:.4f}; pairs ordered right: "
          f"{best.ordered}/{pairs}")
    near = [f for f in fits if f.rmse <= 1.1 * best.rmse]
    ratios = sorted(f.beta / f.alpha for f in near)
    print(f"  {len(near)} of {len(fits)} fits lie within 10 % of that error: alpha {min(f.alpha for f in near):.2f}-"
          f"{max(f.alpha for f in near):.2f}, beta {min(f.beta for f in near):.2f}-{max(f.beta for f in near):.2f}, "
          f"R {', '.join(f'{r:g}' for r in sorted({f.repeats for f in near}))}; beta/alpha {ratios[0]:.2f}-{ratios[-1]:.2f}")
    print(f"  compute-optimal width: N_best grows as D_eff^(beta/alpha), so K = D/N as D^(1 - beta/alpha); "
          f"the best fit's beta/alpha = {best.beta / best.alpha:.2f}")
    right = [f for f in near if f.ordered == pairs]
    print(f"  of those, {len(right)} order every pair right"
          + (f" (the best: alpha {right[0].alpha:.2f}, beta {right[0].beta:.2f}, R {right[0].repeats:g}, "
             f"RMSE {right[0].rmse:.4f})" if right else ""))


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
                         + (f", average {train['ema_decay']:g}" if train["ema_decay"] else "")
                         + f", decay {train['weight_decay']:g}, peak rate {train['learning_rate']:g}")
            print(f"  {name} {budget}: " + next(line for line in done.stderr.splitlines() if line.startswith("size:")),
                  file=sys.stderr, flush=True)
        print(f"| {Path(name).name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpora", nargs="*", help="paths or names: shakespeare, pydocs, pysource, prose, german")
    parser.add_argument("--budgets", default="5m,20m", help="comma-separated time budgets")
    parser.add_argument("--widths", default="256,384,512", help="comma-separated widths (2 layers each)")
    parser.add_argument("--speeds", help="WIDTH=chars/s,... instead of timing them now")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each on cores/jobs threads)")
    parser.add_argument("--work", default="/tmp/charrnn-sizing", help="run directories and results.jsonl")
    parser.add_argument("--fit", type=Path, help="the bounds this results file puts on the rule (and its table)")
    parser.add_argument("--loss-fit", type=Path, help="fit Chinchilla's parametric loss to every run in this results file")
    parser.add_argument("--choices", action="store_true", help="print what --dry-run picks for each corpus and budget")
    args = parser.parse_args()
    if args.choices:
        choices(args)
    elif args.fit:
        records = read(args.fit)
        table(records)
        fit(records)
    elif args.loss_fit:
        loss_fit(read(args.loss_fit))
    elif args.corpora:
        sweep(args)
    else:
        parser.error("give corpora to sweep, or --fit RESULTS")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""charrnn against a plain PyTorch baseline, side by side in one process.

    python scripts/bench.py --quick      # about a minute
    python scripts/bench.py              # the full run (under 10 minutes on 2 CPU cores)
    python scripts/bench.py --device cuda --sample-streams 1,1024

Prints a table and, last, one JSON line. The baselines are written here, plainly:
training is an fp32 nn.LSTM loop (embedding -> nn.LSTM -> linear, AdamW, clipping);
sampling calls nn.LSTM once per character. Figures are ratios to those baselines,
measured on the same data in the same process; absolute numbers on a shared machine
mean little.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import charrnn  # noqa: E402
from charrnn.config import ModelConfig, TrainConfig  # noqa: E402
from charrnn.data.text import Vocab, embedded_corpus, read_corpus, split  # noqa: E402
from charrnn.device import dtype_name, optimizer_kernels, resolve_device, resolve_dtype  # noqa: E402
from charrnn.infer.evaluate import evaluate  # noqa: E402
from charrnn.model.network import CharRNN  # noqa: E402
from charrnn.infer.sample import SampleSettings, generate  # noqa: E402
from charrnn.training.run import trainer_for  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, seconds, device, warmup=2):
    """Run fn repeatedly for about `seconds` after warmup calls; returns (calls, elapsed)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start, calls = time.perf_counter(), 0
    while True:
        fn()
        calls += 1
        if calls % 4 == 0 or device.type != "cuda":
            sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return calls, elapsed


def matmul_peak(device, dtype, seconds):
    """GFLOP/s of the best of a few matmuls (square, and the LSTM's own gate GEMM shape):
    the ceiling the training figures are compared with."""
    scale = 4 if device.type == "cuda" else 1
    best = 0.0
    for m, k, n in ((1024 * scale, 1024 * scale, 1024 * scale), (6400 * scale, 512, 2048), (4096, 1024, 2048)):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        calls, elapsed = timed(lambda: a @ b, seconds / 3, device)
        best = max(best, 2 * m * k * n * calls / elapsed / 1e9)
    return best


class BaselineLM(nn.Module):
    def __init__(self, vocab_size, hidden, layers, embedding=64):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding)
        self.lstm = nn.LSTM(embedding, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x, state=None):
        out, state = self.lstm(self.embedding(x), state)
        return self.head(out), state


def matmul_flops_per_char(hidden, layers, vocab, embedding=64):
    """Training FLOPs per character: 6 x the multiply-accumulates of the LSTM and head."""
    macs = 4 * hidden * (embedding + hidden)
    macs += (layers - 1) * 4 * hidden * (2 * hidden)
    macs += hidden * vocab
    return 6 * macs


def bench_training(corpus, ids, vocab_size, hidden, layers, batch, seq, device, seconds, peaks):
    """chars/s of the fp32 baseline loop and of charrnn's own step at its default precision."""
    flops = matmul_flops_per_char(hidden, layers, vocab_size)
    train_ids = ids[: max(len(ids), batch * seq * 4 + 1)]
    # Baseline: fp32 nn.LSTM, stateful batches, AdamW, clipping.
    torch.manual_seed(0)
    base = BaselineLM(vocab_size, hidden, layers).to(device)
    opt = torch.optim.AdamW(base.parameters(), lr=2e-3)
    stream = (len(train_ids) - 1) // batch
    xs = train_ids[: batch * stream].view(batch, stream).long().to(device)
    ys = train_ids[1 : batch * stream + 1].view(batch, stream).long().to(device)
    position = {"k": 0, "state": None}

    def base_step():
        k = position["k"] % (stream // seq)
        x, y = xs[:, k * seq : (k + 1) * seq], ys[:, k * seq : (k + 1) * seq]
        logits, state = base(x, position["state"])
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(base.parameters(), 1.0)
        opt.step()
        position["state"] = tuple(s.detach() for s in state)
        position["k"] += 1

    calls, elapsed = timed(base_step, seconds, device)
    base_rate = calls * batch * seq / elapsed
    # charrnn: the Trainer's own step (stateful batches, autocast at its default dtype).
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(corpus, ModelConfig(hidden_size=hidden, num_layers=layers, dropout=0.0),
                              TrainConfig(batch_size=batch, seq_len=seq, device=str(device), steps=1, sample_length=0),
                              Path(tmp) / "run")
        calls, elapsed = timed(trainer.step, seconds, device)
    rate = calls * batch * seq / elapsed
    dtype = dtype_name(trainer.plan.dtype)
    peak = peaks["bf16" if dtype == "bf16" else "fp32"] if dtype != "fp16" else peaks.get("fp16", peaks["fp32"])
    return {
        "config": f"{layers}x{hidden} b{batch} t{seq}", "dtype": dtype,
        "baseline_chars_per_s": base_rate, "charrnn_chars_per_s": rate, "ratio": rate / base_rate,
        "baseline_gflops": base_rate * flops / 1e9, "charrnn_gflops": rate * flops / 1e9,
        "baseline_peak_fraction": base_rate * flops / 1e9 / peaks["fp32"],
        "charrnn_peak_fraction": rate * flops / 1e9 / peak,
    }


def bench_cells(corpus, device, seconds, cells=("lstm", "gru", "rnn", "peephole", "layernorm")):
    """Per cell at 2x512: training chars/s (charrnn's step, default precision) vs nn.LSTM,
    and 1-stream sampling chars/s through the packed decoder vs the per-character forward."""
    rates = {}
    for cell in cells:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = trainer_for(corpus, ModelConfig(cell=cell),
                                  TrainConfig(device=str(device), steps=1, sample_length=0, batch_size=64, seq_len=100),
                                  Path(tmp) / "run")
            calls, elapsed = timed(trainer.step, seconds, device)
            model, vocab = trainer.state.model.eval(), trainer.plan.vocab
        rates[cell] = {"chars_per_s": calls * 64 * 100 / elapsed}
        for fast in (True, False):
            rates[cell]["sample_fast" if fast else "sample_reference"] = sampling_rate(
                model, vocab, device, seconds / 2, 1, fast=fast)
    for cell, r in rates.items():
        r["ratio_to_lstm"] = r["chars_per_s"] / rates["lstm"]["chars_per_s"]
        r["sample_ratio"] = r["sample_fast"] / r["sample_reference"]
    return rates


def in_turns(trainers, device, seconds, rounds):
    """Training chars/s of each trainer's step, the trainers taking turns `rounds` times
    (so a machine that speeds up or slows down meanwhile affects them alike)."""
    totals = {name: [0, 0.0] for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            calls, elapsed = timed(trainer.step, seconds / rounds, device, warmup=1)
            totals[name][0] += calls
            totals[name][1] += elapsed
    return {name: calls * trainers[name].config.batch_size * trainers[name].config.seq_len / elapsed
            for name, (calls, elapsed) in totals.items()}


def bench_options(corpus, device, seconds, rounds=3):
    """Training chars/s of the LSTM at 2x512 with each newer option on, as a ratio to the
    same step with it off; the variants take turns, `rounds` times, so a machine that
    speeds up or slows down meanwhile affects them alike."""
    variants = {
        "plain": ({}, {}),
        "weight_drop": ({"weight_drop": 0.25}, {}),
        "ema": ({}, {"ema_decay": 0.998}),
        "stream_restart": ({}, {"stream_restart": 0.1}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: trainer_for(corpus, ModelConfig(dropout=0.0, **model),
                                      TrainConfig(device=str(device), steps=1, sample_length=0, batch_size=64, seq_len=100,
                                                  **train), Path(tmp) / name)
                    for name, (model, train) in variants.items()}
        rates = in_turns(trainers, device, seconds, rounds)
    return {name: {"chars_per_s": rate, "ratio_to_plain": rate / rates["plain"]} for name, rate in rates.items()}


def bench_optimizer(corpus, device, seconds, rounds=3):
    """Training chars/s of the trainer's step with AdamW's kernels as the trainer picks them
    (fused where built: CUDA, CPUs from torch 2.4) against foreach, at a CPU run's default
    shape (2x256, batch 16 x 100), where the optimizer is a larger share of the step; the
    two take turns, `rounds` times."""
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("picked", "foreach"):
            trainer = trainer_for(corpus, ModelConfig(hidden_size=256, dropout=0.1),
                                  TrainConfig(device=str(device), steps=1, sample_length=0, batch_size=16, seq_len=100,
                                              ema_decay=0.998), Path(tmp) / name)
            if name == "foreach":
                old = trainer.state.optimizer
                trainer.state.optimizer = torch.optim.AdamW(
                    [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in old.param_groups],
                    lr=old.defaults["lr"], betas=old.defaults["betas"], foreach=True)
            trainers[name] = trainer
        rates = in_turns(trainers, device, seconds, rounds)
    return {"picked_kernels": next(iter(optimizer_kernels(device.type))),
            **{f"{name}_chars_per_s": rate for name, rate in rates.items()}, "ratio": rates["picked"] / rates["foreach"]}


def sampling_rate(model, vocab, device, seconds, streams, fast=True, dtype=None):
    """chars/s of charrnn's sampler, all streams together, over about `seconds`."""
    gen = torch.Generator(device).manual_seed(0)
    prime = torch.zeros(1, dtype=torch.long)

    def run(n):
        for _ in generate(model, vocab, prime, SampleSettings(length=n, temperature=1.0), streams, gen, device,
                          fast=fast, dtype=dtype):
            pass

    return _rate(run, max(50, 2000 // streams), seconds, device) * streams


def _rate(fn, n_chars, seconds, device):
    fn(8)
    sync(device)
    total, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(n_chars)
        total += n_chars
    sync(device)
    return total / (time.perf_counter() - start)


def bench_quality(corpus, hidden, layers, batch, seq, steps, device):
    """Validation loss after the same number of steps at the default precision and in fp32."""
    out = {}
    for dtype in ("auto", "fp32"):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = trainer_for(corpus, ModelConfig(hidden_size=hidden, num_layers=layers),
                                  TrainConfig(batch_size=batch, seq_len=seq, steps=steps, eval_every=steps,
                                              dtype=dtype, device=str(device), sample_length=0),
                                  Path(tmp) / "run")
            start = time.perf_counter()
            summary = trainer.run()
            out[dtype_name(trainer.plan.dtype) if dtype == "auto" else "fp32"] = {
                "val_loss": summary["val_loss"], "seconds": time.perf_counter() - start}
    names = list(out)
    return {"steps": steps, "config": f"{layers}x{hidden} b{batch} t{seq}", "results": out,
            "delta": out[names[0]]["val_loss"] - out["fp32"]["val_loss"]}


def bench_sampling(vocab_size, hidden, layers, device, seconds, streams_list, dtype):
    """chars/s: the per-character nn.LSTM loop (1 stream) vs charrnn's decoder."""
    torch.manual_seed(0)
    vocab = Vocab("".join(chr(32 + i) for i in range(vocab_size)))
    model = CharRNN(ModelConfig(hidden_size=hidden, num_layers=layers, dropout=0.0), vocab_size).to(device).eval()
    base_model = BaselineLM(vocab_size, hidden, layers).to(device).eval()
    gen = torch.Generator(device).manual_seed(0)

    @torch.no_grad()
    def baseline(n):
        x = torch.zeros(1, 1, dtype=torch.long, device=device)
        state = None
        for _ in range(n):
            logits, state = base_model(x, state)
            probs = torch.softmax(logits[:, -1], dim=-1)
            x = torch.multinomial(probs, 1, generator=gen)
            x.item()  # a streaming sampler needs each character on the host

    base = _rate(baseline, 50, seconds, device)
    results = {"baseline_1_stream_chars_per_s": base}
    for streams in streams_list:
        r = sampling_rate(model, vocab, device, seconds, streams, dtype=dtype)
        results[f"charrnn_{streams}_streams_chars_per_s"] = r
        results[f"ratio_{streams}_streams"] = r / base
    return results


def bench_eval(corpus_ids, vocab_size, hidden, layers, device, dtype):
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(hidden_size=hidden, num_layers=layers), vocab_size).to(device).eval()
    ids = corpus_ids[:200_000]
    evaluate(model, ids[:5000], device, dtype)
    start = time.perf_counter()
    evaluate(model, ids, device, dtype)
    sync(device)
    return {"chars_per_s": len(ids) / (time.perf_counter() - start), "dtype": dtype_name(dtype)}


ENCODE_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
import torch
from charrnn.data.text import read_corpus, Vocab

def high_water():  # VmHWM starts afresh at exec (ru_maxrss would carry the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

base = high_water()
start = time.perf_counter()
corpus = read_corpus([sys.argv[1]])
vocab = Vocab.from_data(corpus)
ids = vocab.encode_data(corpus)
elapsed = time.perf_counter() - start
print(len(ids), elapsed, base, high_water(), ids.dtype)
"""


def bench_encoding(megabytes):
    """Read + check + vocabulary + encode a generated ASCII corpus, in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.txt"
        gen = torch.Generator().manual_seed(0)
        block = bytes((torch.randint(32, 127, (1 << 20,), generator=gen)).to(torch.uint8).tolist())
        block = block.replace(b"~", b"\n")
        with open(path, "wb") as handle:
            for _ in range(megabytes):
                handle.write(block)
        size = path.stat().st_size
        out = subprocess.run([sys.executable, "-c", ENCODE_CHILD, str(path), str(ROOT)], capture_output=True,
                             text=True, check=True).stdout.split()
    chars, elapsed, base_rss, peak_rss = int(out[0]), float(out[1]), int(out[2]), int(out[3])
    return {"megabytes": size / 1e6, "chars": chars, "mb_per_s": size / 1e6 / elapsed, "id_dtype": out[4],
            "peak_rss_mb": peak_rss / 1e6, "rss_before_mb": base_rss / 1e6,
            "peak_rss_over_file": peak_rss / size, "added_rss_over_file": (peak_rss - base_rss) / size}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sample-streams", default="1,64", help="comma-separated stream counts to sample")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: train,cells,options,optimizer,quality,sample,eval,encode")
    args = parser.parse_args()
    device, reason = resolve_device(args.device)
    dtype, dtype_reason = resolve_dtype("auto", device)
    skip = set(filter(None, args.skip.split(",")))
    seconds = 3.0 if args.quick else 12.0
    corpus = read_corpus([str(SHAKESPEARE)]) if SHAKESPEARE.exists() else embedded_corpus()
    vocab = Vocab.from_data(corpus)
    ids = vocab.encode_data(corpus)
    train_ids, _ = split(ids, 0.1)
    info = {"date": date.today().isoformat(), "device": _device_name(device), "torch": torch.__version__,
            "charrnn": charrnn.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "corpus": corpus.sources[0], "default_dtype": dtype_name(dtype), "dtype_reason": dtype_reason,
            "quick": args.quick}
    print(f"device: {info['device']} ({reason}); torch {torch.__version__}; {info['threads']} threads; "
          f"default dtype {info['default_dtype']} ({dtype_reason})", file=sys.stderr)
    results = {"info": info}
    peaks = {"fp32": matmul_peak(device, torch.float32, 1.0 if args.quick else 3.0)}
    if dtype is not None:
        peaks[dtype_name(dtype)] = matmul_peak(device, dtype, 1.0 if args.quick else 3.0)
    results["matmul_peak_gflops"] = peaks
    if "train" not in skip:
        configs = [(512, 2, 64, 100), (128, 2, 50, 50)]
        if device.type == "cuda":
            configs.append((1024, 3, 128, 256))
        results["train"] = [bench_training(corpus, train_ids, len(vocab), h, l, b, t, device, seconds, peaks)
                            for h, l, b, t in configs]
    if "cells" not in skip:
        results["cells"] = bench_cells(corpus, device, seconds / 2)
    if "options" not in skip:
        results["options"] = bench_options(corpus, device, seconds)
    if "optimizer" not in skip:
        results["optimizer"] = bench_optimizer(corpus, device, seconds)
    if "quality" not in skip:
        if args.quick:
            results["quality"] = bench_quality(corpus, 128, 2, 32, 64, 100, device)
        else:
            results["quality"] = bench_quality(corpus, 512, 2, 64, 100, 150, device)
    if "sample" not in skip:
        streams = [int(s) for s in args.sample_streams.split(",")]
        results["sample"] = bench_sampling(len(vocab), 512, 2, device, 2.0 if args.quick else 5.0, streams, dtype)
    if "eval" not in skip:
        results["eval"] = bench_eval(ids, len(vocab), 512, 2, device, dtype)
    if "encode" not in skip:
        results["encode"] = bench_encoding(20 if args.quick else 100)
    print_table(results)
    print(json.dumps(results))


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def print_table(results):
    rows = [("what", "baseline", "charrnn", "ratio")]
    for r in results.get("train", []):
        rows.append((f"train chars/s {r['config']} ({r['dtype']})", f"{r['baseline_chars_per_s']:,.0f}",
                     f"{r['charrnn_chars_per_s']:,.0f}", f"{r['ratio']:.2f}x"))
        rows.append(("  GFLOP/s, fraction of matmul peak", f"{r['baseline_gflops']:.0f} ({r['baseline_peak_fraction']:.0%})",
                     f"{r['charrnn_gflops']:.0f} ({r['charrnn_peak_fraction']:.0%})", ""))
    for cell, r in results.get("cells", {}).items():
        rows.append((f"train chars/s 2x512 --cell {cell}", "", f"{r['chars_per_s']:,.0f}",
                     f"{r['ratio_to_lstm']:.2f}x lstm"))
    for cell, r in results.get("cells", {}).items():
        rows.append((f"sample chars/s 1 stream --cell {cell}", f"{r['sample_reference']:,.0f} (forward)",
                     f"{r['sample_fast']:,.0f}", f"{r['sample_ratio']:.2f}x"))
    options = results.get("options", {})
    for name, r in options.items():
        if name != "plain":
            rows.append((f"train chars/s 2x512 with {name}", f"{options['plain']['chars_per_s']:,.0f} (off)",
                         f"{r['chars_per_s']:,.0f}", f"{r['ratio_to_plain']:.2f}x"))
    if "optimizer" in results:
        o = results["optimizer"]
        rows.append((f"train chars/s 2x256 b16, AdamW {o['picked_kernels']}", f"{o['foreach_chars_per_s']:,.0f} (foreach)",
                     f"{o['picked_chars_per_s']:,.0f}", f"{o['ratio']:.2f}x"))
    if "quality" in results:
        q = results["quality"]
        names = list(q["results"])
        rows.append((f"val loss after {q['steps']} steps {q['config']}", f"{q['results']['fp32']['val_loss']:.4f} (fp32)",
                     f"{q['results'][names[0]]['val_loss']:.4f} ({names[0]})", f"{q['delta']:+.4f}"))
    if "sample" in results:
        s = results["sample"]
        for key, value in s.items():
            if key.startswith("charrnn_"):
                streams = key.split("_")[1]
                rows.append((f"sample chars/s, {streams} stream(s), 2x512", f"{s['baseline_1_stream_chars_per_s']:,.0f} (1 stream)",
                             f"{value:,.0f}", f"{s[f'ratio_{streams}_streams']:.1f}x"))
    if "eval" in results:
        rows.append((f"eval chars/s 2x512 ({results['eval']['dtype']})", "", f"{results['eval']['chars_per_s']:,.0f}", ""))
    if "encode" in results:
        e = results["encode"]
        rows.append((f"encode {e['megabytes']:.0f} MB ASCII: MB/s", "", f"{e['mb_per_s']:.0f}", ""))
        rows.append(("  peak RSS / file size (added by encoding)", "",
                     f"{e['peak_rss_over_file']:.2f}x ({e['added_rss_over_file']:.2f}x)", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    peaks = results["matmul_peak_gflops"]
    print("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))


if __name__ == "__main__":
    main()

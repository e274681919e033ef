"""Corpora of any size: preparation rate, memory and start-up time at 100 MB, 1 GB and 10 GB.

    python scripts/bench_data.py [--sizes 100M,1G,10G] [--work DIR] [--ranks] [--cold]

Builds each corpus from ../shared/data/tinyshakespeare.txt, its paragraphs shuffled anew
for every copy (seeded), so that it is not one short period repeated, then measures, each
command alone in a subprocess (peak RSS from wait4):

- prepare: `charrnn prepare BIG --json` into a fresh cache: MB/s of text, the id file's size;
- train (second run, the id file reused; with --cold, from a dropped page cache):
  `charrnn train BIG --steps 20` peak RSS, seconds
  from the command to its first step (when the setup lines are out), and chars/s of its
  steps against the same model on the 1 MB baseline corpus run in this same process;
- eval: `charrnn eval BIG` peak RSS (1 GB only, the full pass takes long past it);
- with --ranks, torchrun 2 ranks on the largest corpus: each rank's peak RSS, its anonymous
  and file-backed share, and the id file's mapping Rss / Pss (Pss = Rss / 2 when both ranks
  share the page cache's one copy).

And in this process, the baseline: today's in-memory encoding (Vocab.from_data +
encode_data) of the 100 MB corpus, MB/s. The last line is JSON. Needs ~2.3x the largest size
on disk (the text and its id file).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
MODEL = ["--hidden-size", "256", "--num-layers", "2", "--dropout", "0", "--weight-decay", "0.01",
         "--batch-size", "32", "--seq-len", "128", "--device", "cpu", "--dtype", "fp32", "--no-start-mix"]
COLD = False  # --cold
SIZES = {"1M": 1 << 20, "100M": 100 << 20, "1G": 1 << 30, "10G": 10 << 30}


def build(path: Path, size: int, source: str, seed: int = 0) -> None:
    """size bytes of source's paragraphs, shuffled for every copy."""
    if path.exists() and path.stat().st_size == size:
        return
    paragraphs = [p + "\n\n" for p in source.split("\n\n")]
    rng = random.Random(seed)
    written = 0
    with open(path, "w") as out:
        while written < size:
            rng.shuffle(paragraphs)
            block = "".join(paragraphs)[: size - written]
            out.write(block)
            written += len(block.encode())


def measure(cmd: list[str], env: dict, first_line: str | None = None) -> dict:
    """Run cmd; its wall seconds, peak RSS (MB), stdout, and when first_line first appeared on stderr."""
    started = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = {}

    def read_stderr():
        lines = []
        for line in process.stderr:
            lines.append(line)
            if first_line and first_line in line and "at" not in seen:
                seen["at"] = time.perf_counter() - started
        seen["stderr"] = "".join(lines)

    reader = threading.Thread(target=read_stderr)
    reader.start()
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    reader.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({process.returncode}):\n{seen.get('stderr', '')[-3000:]}")
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": stdout,
            "first_line_s": seen.get("at")}


def charrnn(*args) -> list[str]:
    return [sys.executable, "-m", "charrnn", *map(str, args)]


def train_rate(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["chars_per_s"]


def bench_size(name: str, corpus: Path, work: Path, env: dict, baseline_rate: float | None) -> dict:
    cache = work / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**env, "CHARRNN_CACHE": str(cache)}
    prep = measure(charrnn("prepare", corpus, "--json"), env)
    info = json.loads(prep["stdout"])
    row = {"corpus": name, "bytes": corpus.stat().st_size, "prepare_s": round(prep["seconds"], 2),
           "prepare_mb_s": round(corpus.stat().st_size / 1e6 / info["seconds"], 1),  # the preparation itself
           "prepare_command_mb_s": round(corpus.stat().st_size / 1e6 / prep["seconds"], 1),  # with Python's start
           "prepare_peak_rss_mb": round(prep["peak_rss_mb"]), "id_file_bytes": info["file_bytes"]}
    run = work / f"run-{name}"
    shutil.rmtree(run, ignore_errors=True)
    if COLD:  # the text and its id file read from the disk, not the page cache
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    train = measure(charrnn("train", corpus, "--steps", 20, "--eval-every", 20, "--sample-length", 0, "-o", run,
                            *MODEL), env, first_line="stop:")
    row.update(train_peak_rss_mb=round(train["peak_rss_mb"]), first_step_s=round(train["first_line_s"], 2),
               train_s=round(train["seconds"], 2), chars_per_s=round(train_rate(run)))
    if baseline_rate:
        row["steps_vs_1mb"] = round(row["chars_per_s"] / baseline_rate, 3)
    shutil.rmtree(run, ignore_errors=True)
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def bench_eval(corpus: Path, work: Path, env: dict) -> dict:
    run = work / "run-eval-model"
    if not (run / "best.pt").exists():
        measure(charrnn("train", corpus.parent / corpus.name.replace("1G", "1M"), "--steps", 5, "--eval-every", 5, "--sample-length", 0, "-o", run,
                        *MODEL), env)
    env = {**env, "CHARRNN_CACHE": str(work / "cache-eval")}
    result = measure(charrnn("eval", corpus, "-m", run, "--json", "--device", "cpu", "--dtype", "fp32"), env)
    return {"eval_corpus_bytes": corpus.stat().st_size, "eval_peak_rss_mb": round(result["peak_rss_mb"]),
            "eval_s": round(result["seconds"], 1), "eval": json.loads(result["stdout"])["loss"]}


def bench_ranks(corpus: Path, work: Path, env: dict) -> dict:
    """torchrun 2 ranks, 20 steps: per rank peak RSS (VmHWM), and the id file mapping's Rss/Pss."""
    run = work / "run-ranks"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "charrnn",
           "train", str(corpus), "--steps", "20", "--eval-every", "20", "--sample-length", "0", "-o", str(run), *MODEL]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**env, "CHARRNN_CACHE": str(work / "cache-10G" if "10G" in corpus.name else work / "cache-ranks")})
    ranks: dict[int, dict] = {}
    while process.poll() is None:
        for pid in _descendants(process.pid):
            status = _status(pid)
            if status is None or "charrnn" not in _cmdline(pid):
                continue
            seen = ranks.setdefault(pid, {})
            for key in ("VmHWM", "RssAnon", "RssFile"):
                seen[key] = max(seen.get(key, 0), status.get(key, 0))
            mapping = _ids_mapping(pid)
            if mapping:
                seen["ids_rss"], seen["ids_pss"], seen["ids_file"] = mapping
        time.sleep(0.2)
    stderr = process.stderr.read()
    if process.returncode != 0:
        raise SystemExit(f"torchrun failed ({process.returncode}):\n{stderr[-3000:]}")
    ranks = {pid: r for pid, r in ranks.items() if "ids_file" in r}
    mb = lambda kb: round(kb / 1024)  # noqa: E731
    return {"ranks": [{"peak_rss_mb": mb(r["VmHWM"]), "rss_anon_mb": mb(r["RssAnon"]), "rss_file_mb": mb(r["RssFile"]),
                       "ids_map_rss_kb": r["ids_rss"], "ids_map_pss_kb": r["ids_pss"], "ids_file": r["ids_file"]}
                      for r in ranks.values()],
            "ranks_peak_rss_sum_mb": sum(mb(r["VmHWM"]) for r in ranks.values())}


def _descendants(pid: int) -> list[int]:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _status(pid: int) -> dict | None:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines) if v.strip().endswith("kB")}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ids_mapping(pid: int) -> tuple[int, int, str] | None:
    """Rss and Pss (kB) of the mapped id file in pid, from /proc/PID/smaps."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    rss = pss = 0
    name, inside = None, False
    for line in text.splitlines():
        if "-" in line.split(" ", 1)[0] and not line.endswith("kB"):
            inside = line.rstrip().endswith(".ids")
            if inside:
                name = line.split()[-1]
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1])
        elif inside and line.startswith("Pss:"):
            pss += int(line.split()[1])
    return (rss, pss, name) if name else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100M,1G,10G")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "charrnn-bench-data")
    parser.add_argument("--ranks", action="store_true", help="also torchrun 2 ranks on the largest corpus")
    parser.add_argument("--no-eval", action="store_true", help="skip the eval of the 1 GB corpus")
    parser.add_argument("--device", default="cpu", help="cpu (fp32), or cuda (its auto dtype)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each train run (needs root)")
    args = parser.parse_args()
    global COLD
    COLD = args.cold
    if args.device != "cpu":
        MODEL[MODEL.index("--device") + 1] = args.device
        MODEL[MODEL.index("--dtype") + 1] = "auto"
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    sizes = args.sizes.split(",")
    sys.path.insert(0, str(ROOT))
    from charrnn.data.text import embedded_corpus

    # Tiny Shakespeare where ../shared is beside the checkout, else the embedded Python docs
    # (a GPU machine has only the repository).
    source = SHAKESPEARE.read_text() if SHAKESPEARE.exists() else embedded_corpus().data.decode("utf-8")
    stem = "shakespeare" if SHAKESPEARE.exists() else "pydocs"
    corpora = {name: args.work / f"{stem}-{name}.txt" for name in ["1M", *sizes]}
    for name, path in corpora.items():
        started = time.perf_counter()
        build(path, SIZES[name], source)
        print(f"corpus {name}: {path} ({time.perf_counter() - started:.0f}s to build)", file=sys.stderr, flush=True)

    from charrnn.data.text import Vocab, read_corpus

    result = {"machine": os.uname().machine, "cpus": os.cpu_count(), "device": args.device, "source": stem}
    if "100M" in corpora:  # today's in-memory encoding, in this process: the baseline rate
        started = time.perf_counter()
        corpus = read_corpus([str(corpora["100M"])])
        Vocab.from_data(corpus).encode_data(corpus)
        result["baseline_encode_mb_s"] = round(corpora["100M"].stat().st_size / 1e6 / (time.perf_counter() - started), 1)
        del corpus
    base = bench_size("1M", corpora["1M"], args.work, env, None)
    rows = [base] + [bench_size(name, corpora[name], args.work, env, base["chars_per_s"]) for name in sizes]
    result["rows"] = rows
    if "baseline_encode_mb_s" in result:
        for row in rows:
            row["prepare_vs_baseline"] = round(row["prepare_mb_s"] / result["baseline_encode_mb_s"], 2)
    if "1G" in corpora and not args.no_eval:
        result.update(bench_eval(corpora["1G"], args.work, env))
    if args.ranks:
        result.update(bench_ranks(corpora[sizes[-1]], args.work, env))
    print(f"{'corpus':>6} {'MB/s prep':>9} {'prep RSS':>8} {'id file':>14} {'train RSS':>9} {'1st step':>8} "
          f"{'chars/s':>8} {'vs 1 MB':>7}", file=sys.stderr)
    for row in rows:
        print(f"{row['corpus']:>6} {row['prepare_mb_s']:>9} {row['prepare_peak_rss_mb']:>7}M {row['id_file_bytes']:>14,} "
              f"{row['train_peak_rss_mb']:>8}M {row['first_step_s']:>7}s {row['chars_per_s']:>8} "
              f"{row.get('steps_vs_1mb', 1.0):>7}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

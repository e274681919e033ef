"""A run's directory: what training writes there and how it is read back.

    runs/<name>/
      config.toml     the resolved configs (charrnn train -c reads it back)
      last.pt         the checkpoint to resume from, written at every validation
      best.pt         the checkpoint with the best validation loss so far
      metrics.jsonl   one record a validation (charrnn.events.Validation)
      samples.jsonl   the text sampled at each validation (charrnn.events.Sample)

Every file is written atomically (charrnn.atomic) or appended a line at a time; `records`
is the one reader of the JSONL files, for resume (which trims records written after the
checkpoint it resumes from) and for `charrnn viz` (which shows what it can).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from charrnn.atomic import append_line, write_problem, write_text
from charrnn.errors import CheckpointError, DataError, UsageError
from charrnn.store import checkpoint

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # a directory holding one of these holds a run
JOURNALS = ("metrics.jsonl", "samples.jsonl")


def choose(out: str | None, corpus_name: str, root: str | Path = "runs") -> tuple[Path, str]:
    """--out as given (it must not hold a run), else runs/<corpus name>[-N], never reused;
    and why that one."""
    if out:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise UsageError(f"--out {path} is a file, not a directory; give a new or empty directory")
        if any((path / name).exists() for name in RUN_FILES):
            raise UsageError(f"{path} already holds a run; continue it with --resume {path} or pick another --out")
        return path, "asked for"
    base = Path(root) / corpus_name
    path, n = base, 1
    while path.exists() and any(path.iterdir()):
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path, "new" if n == 1 else f"{base} is taken"


def is_run(directory: Path) -> bool:
    """Whether a directory was written by charrnn train (it has a history to show)."""
    return (directory / "metrics.jsonl").exists() or (directory / "config.toml").exists()


def records(path: Path, strict: bool = True, on_notice: Callable[[str], None] = lambda message: None) -> list[tuple[str, dict]]:
    """The (line, record) pairs of metrics.jsonl or samples.jsonl ([] if it is missing).

    A torn last line (a crash or a full disk mid-write) is dropped with a notice. Damage
    anywhere else is an error naming the line when strict (resume, which rewrites the
    file), else skipped (a report shows what it can)."""
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8", errors="strict" if strict else "replace").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}; move it away to resume without its history") from None
    found = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            if number == len(lines):
                on_notice(f"{path}: dropped its last line, cut off mid-write")
                break
            if not strict:
                continue
            raise DataError(f"{path} is damaged at line {number} (not a record with a step); "
                            "fix or remove that line, or move the file away, to resume") from None
        found.append((line, record))
    return found


class RunDir:
    """The directory of one run, as training writes it (rank 0 only under DDP)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def prepare(self, config_toml: str, resumed_step: int | None, on_notice: Callable[[str], None]) -> None:
        """Create it, drop temp files a killed process left, write config.toml; when resuming,
        drop the records written after the checkpoint resumed from (a killed run's last eval)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            problem = write_problem(err) or err.strerror
            raise CheckpointError(f"cannot create the run directory {self.path}: {problem}") from None
        for stale in self.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        write_text(self.path / "config.toml", config_toml)
        for name in JOURNALS if resumed_step is not None else ():
            path = self.path / name
            if path.exists():
                kept = [line for line, record in records(path, on_notice=on_notice) if record["step"] <= resumed_step]
                write_text(path, "".join(line + "\n" for line in kept))

    def append(self, name: str, record: dict) -> None:
        """One record at the end of metrics.jsonl or samples.jsonl."""
        append_line(self.path / name, json.dumps(record))

    def save(self, payload: checkpoint.Checkpoint, best: bool) -> None:
        """last.pt, and best.pt too when this is the best validation so far."""
        checkpoint.save(self.path / "last.pt", payload)
        if best:
            checkpoint.save(self.path / "best.pt", payload)

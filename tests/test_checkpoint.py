import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from charrnn import checkpoint
from charrnn.errors import CheckpointError

from conftest import ROOT, VERSE


def test_checkpoint_loads_with_weights_only(trained_run):
    payload = torch.load(trained_run / "last.pt", weights_only=True)
    assert payload["format"] == "charrnn-checkpoint" and payload["format_version"] == 1
    assert payload["vocab"] == "".join(sorted(set(VERSE)))
    for key in ("model_config", "model", "optimizer", "train_config", "progress", "carried_state", "rng", "corpus"):
        assert key in payload


def test_round_trip_gives_identical_logits(trained_run, tmp_path):
    payload = checkpoint.load(trained_run / "best.pt")
    model, vocab = checkpoint.restore_model(payload)
    checkpoint.save(tmp_path / "copy.pt", {k: v for k, v in payload.items() if k != "path"})
    again, _ = checkpoint.restore_model(checkpoint.load(tmp_path / "copy.pt"))
    x, _ = vocab.encode(VERSE)
    with torch.no_grad():
        assert torch.equal(model(x.long()[None])[0], again(x.long()[None])[0])


def test_run_directory_resolves_to_best(trained_run):
    assert checkpoint.resolve(trained_run).name == "best.pt"
    assert checkpoint.latest_run(trained_run.parent) == trained_run


def test_truncated_checkpoint(trained_run, tmp_path):
    data = (trained_run / "last.pt").read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable charrnn checkpoint"):
        checkpoint.load(bad)


def test_text_file_as_checkpoint(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("just some words\n")
    with pytest.raises(CheckpointError, match="not a readable charrnn checkpoint"):
        checkpoint.load(bad)


def test_foreign_torch_file_and_unknown_version(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a charrnn checkpoint"):
        checkpoint.load(tmp_path / "other.pt")
    torch.save({"format": "charrnn-checkpoint", "format_version": 99, "charrnn_version": "9.0"}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="format 99"):
        checkpoint.load(tmp_path / "new.pt")


def test_save_leaves_no_temporary_files(tmp_path):
    checkpoint.save(tmp_path / "a.pt", {"model": {"w": torch.ones(2)}})
    checkpoint.save(tmp_path / "a.pt", {"model": {"w": torch.zeros(2)}})
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["model"]["w"], torch.zeros(2))


def _mtime(path):
    return path.stat().st_mtime_ns if path.exists() else None


KILL_TRAINING = """
import sys
from charrnn.cli import main
main(sys.argv[1:])
"""


def test_kill_minus_9_never_leaves_a_half_written_checkpoint(tmp_path):
    """Kill a training process at random moments; last.pt always loads; --resume finishes."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(VERSE * 40)
    run_dir = tmp_path / "run"
    common = ["--eval-every", "1", "--sample-length", "0", "--device", "cpu", "--quiet"]
    first = ["train", str(corpus), "--out", str(run_dir), "--hidden-size", "48", "--batch-size", "4",
             "--seq-len", "16", "--steps", "100000", *common]
    resume = ["train", "--resume", str(run_dir), *common]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(0)
    steps_seen = []
    for attempt in range(4):
        args = first if attempt == 0 else resume
        before = _mtime(run_dir / "last.pt")
        proc = subprocess.Popen([sys.executable, "-c", KILL_TRAINING, *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while _mtime(run_dir / "last.pt") == before and time.time() < deadline:
            time.sleep(0.02)  # until this process has written a checkpoint of its own
        time.sleep(rng.uniform(0.3, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        payload = checkpoint.load(run_dir / "last.pt")  # never half-written
        steps_seen.append(payload["progress"]["step"])
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > steps_seen[0]
    target = steps_seen[-1] + 5
    done = subprocess.run([sys.executable, "-c", KILL_TRAINING, *resume, "--steps", str(target)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert checkpoint.load(run_dir / "last.pt")["progress"]["step"] == target
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # stale temp files cleaned

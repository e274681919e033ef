import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, VERSE

from charrnn.errors import CheckpointError
from charrnn.store import checkpoint


def test_checkpoint_loads_with_weights_only(trained_run):
    payload = torch.load(trained_run / "last.pt", weights_only=True)
    assert payload["format"] == "charrnn-checkpoint" and payload["format_version"] == 1
    assert payload["vocab"] == "".join(sorted(set(VERSE)))
    for key in ("model_config", "model", "optimizer", "train_config", "progress", "carried_state", "rng", "corpus"):
        assert key in payload


def test_round_trip_gives_identical_logits(trained_run, tmp_path):
    payload = checkpoint.load(trained_run / "best.pt")
    model, vocab = checkpoint.restore_model(payload)
    checkpoint.save(tmp_path / "copy.pt", payload)  # the typed form saves as it loaded
    again, _ = checkpoint.restore_model(checkpoint.load(tmp_path / "copy.pt"))
    x, _ = vocab.encode(VERSE)
    with torch.no_grad():
        assert torch.equal(model(x.long()[None])[0], again(x.long()[None])[0])


def test_run_directory_resolves_to_best(trained_run):
    assert checkpoint.resolve(trained_run).name == "best.pt"
    assert checkpoint.latest_run(trained_run.parent) == trained_run


def _unreadable_files(trained_run, tmp_path) -> dict[str, Path]:
    """One file of each kind torch.load refuses."""
    data = (trained_run / "last.pt").read_bytes()
    noise = random.Random(35).randbytes(4096)  # seeded: every run reads the same bytes
    files = {"truncated": data[: len(data) // 2], "random bytes": noise,
             "random bytes from 0x80": b"\x80\xf3" + noise,  # a pickle's PROTO opcode, no protocol after it
             "text": b"just some words\n"}

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    paths = {}
    for kind, content in files.items():
        paths[kind] = tmp_path / f"{kind.replace(' ', '_')}.pt"
        paths[kind].write_bytes(content)
    paths["code"] = tmp_path / "code.pt"
    torch.save({"format": "charrnn-checkpoint", "x": Payload()}, paths["code"])
    paths["bare pickle"] = tmp_path / "bare.pt"
    paths["bare pickle"].write_bytes(pickle.dumps({"x": Payload()}, protocol=2))
    return paths


def test_each_kind_of_unreadable_file_gets_its_own_message(trained_run, tmp_path):
    expected = {"truncated": "a PyTorch archive cut short or damaged", "random bytes": "not a PyTorch checkpoint at all",
                "random bytes from 0x80": "not a PyTorch checkpoint at all", "text": "not a PyTorch checkpoint at all", "code": "holds Python code or objects (posix.system)",
                "bare pickle": "holds Python code or objects"}
    messages = {}
    for kind, path in _unreadable_files(trained_run, tmp_path).items():
        with pytest.raises(CheckpointError) as caught:
            checkpoint.load(path)
        messages[kind] = str(caught.value)
        assert expected[kind] in messages[kind] and str(path) in messages[kind] and "\n" not in messages[kind]
    # Random bytes are not called code, nor a cut-short archive.
    assert "code" not in messages["random bytes"] and "cut short" not in messages["random bytes"]
    assert "unreadable" in messages["truncated"] and "unreadable" in messages["random bytes"]


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
        steps_seen.append(payload.progress["step"])
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > steps_seen[0]
    target = steps_seen[-1] + 5
    done = subprocess.run([sys.executable, "-c", KILL_TRAINING, *resume, "--steps", str(target)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert checkpoint.load(run_dir / "last.pt").progress["step"] == target
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # stale temp files cleaned


def _tampered(trained_run, tmp_path, change):
    payload = torch.load(trained_run / "last.pt", weights_only=True)
    change(payload)
    path = tmp_path / "tampered.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("change,expected", [
    (lambda p: p["model"].__setitem__("head.weight", torch.zeros(3, 3)), "head.weight: (3, 3), config says"),
    (lambda p: p["model"].pop("head.bias"), "1 missing (first head.bias)"),
    (lambda p: p.__setitem__("vocab", 7), "vocabulary is not a string"),
    (lambda p: p.__setitem__("vocab", "ba"), "not a sorted string"),
    (lambda p: p.__setitem__("model", [torch.zeros(2)]), "weights are not a table of tensors"),
    (lambda p: p.__setitem__("model_config", {"hidden_size": "big"}), "model config is invalid"),
    (lambda p: p.__setitem__("model_config", 3), "model config is not a table"),
])
def test_a_checkpoint_whose_structure_is_wrong_is_named_in_one_line(trained_run, tmp_path, change, expected):
    path = _tampered(trained_run, tmp_path, change)
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load(path)
    message = str(caught.value)
    assert "damaged or not a charrnn checkpoint" in message and expected in message
    assert str(path) in message and "\n" not in message


def test_a_pickled_payload_is_refused_in_charrnns_words(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "charrnn-checkpoint", "x": Payload()}, path)
    done = subprocess.run([sys.executable, "-m", "charrnn", "sample", "-m", str(path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1 and "pwned" not in done.stdout
    line = done.stderr.strip()
    assert "\n" not in line and "system" in line and "was not loaded" in line
    assert "weights_only" not in line and "\x1b" not in line and "trusted" not in line


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _train(*args):
    return subprocess.run([sys.executable, "-m", "charrnn", "train", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


TINY = ["--hidden-size", "32", "--embedding-size", "16", "--dropout", "0", "--batch-size", "4", "--seq-len", "16",
        "--sample-length", "0", "--eval-every", "2", "--quiet"]


def _error_line(stderr: str) -> str:
    """The one `error:` line, the last on stderr (after the setup lines), no traceback."""
    lines = stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], stderr
    assert "Traceback" not in stderr
    return lines[-1]


def _digests(run):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir())}


def test_a_full_disk_is_named_and_the_previous_files_are_intact(small_disk, tmp_path):
    corpus = tmp_path / "verse.txt"
    corpus.write_text(VERSE * 50, encoding="utf-8")
    run = small_disk / "run"
    assert _train(corpus, "--out", run, "--steps", "4", *TINY).returncode == 0
    before = _digests(run)
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk to the last byte, unbuffered so that no write is left for close()
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    done = _train("--resume", run, "--steps", "8", "--quiet")
    assert done.returncode == 1, done.stderr
    line = _error_line(done.stderr)
    assert "the disk is full" in line and "is intact" in line and str(run) in line
    assert "Error:" not in line and "debug" not in line
    assert _digests(run) == before  # nothing changed, nothing half-written left behind


def test_a_read_only_disk_and_an_out_that_is_a_file_get_their_own_messages(small_disk, tmp_path):
    corpus = tmp_path / "verse.txt"
    corpus.write_text(VERSE * 50, encoding="utf-8")
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk)]).returncode == 0
    done = _train(corpus, "--out", small_disk / "run", "--steps", "2", *TINY)
    assert done.returncode == 1 and "read-only" in _error_line(done.stderr)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    done = _train(corpus, "--out", a_file, "--steps", "2", *TINY)
    assert done.returncode == 2 and "is a file, not a directory" in done.stderr
    assert a_file.read_text() == "x"


def test_kill_9_before_the_first_validation_loses_only_the_time_since_the_last_timed_save(tmp_path):
    corpus = tmp_path / "verse.txt"
    corpus.write_text(VERSE * 50, encoding="utf-8")
    run = tmp_path / "run"
    args = [sys.executable, "-m", "charrnn", "train", str(corpus), "--out", str(run), "--steps", "1000000",
            "--save-every", "2s", *[a for a in TINY if a not in ("--eval-every", "2")], "--eval-every", "1000000"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 120
        while not (run / "last.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (run / "last.pt").exists(), "no timed save within 2 minutes"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (run / "metrics.jsonl").exists()  # no validation had run
    saved = checkpoint.load(run / "last.pt").progress["step"]
    assert saved > 0
    done = _train("--resume", run, "--steps", saved + 3, "--quiet")
    assert done.returncode == 0, done.stderr
    assert checkpoint.load(run / "last.pt").progress["step"] == saved + 3

"""Data-parallel training (DDP) on CPU with gloo: 2 ranks launched by torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, VERSE

from charrnn.data.text import split
from charrnn.infer.evaluate import evaluate
from charrnn.store import checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

COMMON = ["--hidden-size", "32", "--num-layers", "2", "--embedding-size", "16", "--dropout", "0",
          "--batch-size", "4", "--seq-len", "16", "--learning-rate", "0.01", "--min-lr-ratio", "1",
          "--warmup-steps", "0", "--eval-every", "5", "--sample-length", "0", "--dtype", "fp32",
          "--device", "cpu", "--quiet"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def train(ranks, *args):
    if ranks == 1:
        cmd = [sys.executable, "-m", "charrnn", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "charrnn", "train", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "verse.txt"
    path.write_text(VERSE * 200)  # ~26k characters: 2 validation streams, one per rank
    return path


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_parameters(a, b, atol=1e-5):
    pa, pb = checkpoint.load(a).model, checkpoint.load(b).model
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module", params=["--stateless", "--stateful"])
def runs(corpus, tmp_path_factory, request):
    """The same run in one process, in two ranks, and in two ranks resumed in one, for
    random windows (each rank reads its rows of the same batch) and carried streams."""
    root = tmp_path_factory.mktemp("runs")
    layout = [request.param]
    train(1, corpus, "--out", root / "one", "--steps", "20", *COMMON, *layout)
    train(2, corpus, "--out", root / "two", "--steps", "20", *COMMON, *layout)
    train(2, corpus, "--out", root / "half", "--steps", "10", *COMMON, *layout)
    train(1, "--resume", root / "half", "--steps", "20", "--device", "cpu", "--quiet")
    return root


def test_two_ranks_give_the_same_parameters_as_one(runs):
    _assert_same_parameters(runs / "one" / "last.pt", runs / "two" / "last.pt")
    one, two = _metrics(runs / "one"), _metrics(runs / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [5, 10, 15, 20]
    for a, b in zip(one, two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)


def test_two_rank_checkpoint_resumes_in_one_process(runs):
    straight, resumed = _metrics(runs / "two"), _metrics(runs / "half")
    assert [m["step"] for m in resumed] == [5, 10, 15, 20]
    for a, b in zip(straight, resumed):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
    _assert_same_parameters(runs / "two" / "last.pt", runs / "half" / "last.pt")
    # In stateful mode the carried state of all 4 streams was gathered from both ranks.
    payload = checkpoint.load(runs / "half" / "last.pt")
    if not payload.train_config["stateless"]:
        assert payload.carried_state[0].shape == (2, 4, 32)


def test_sharded_validation_equals_one_process(runs, corpus):
    """The 2-rank run's reported val loss (sharded + all-reduced) == one process evaluating the checkpoint."""
    payload = checkpoint.load(runs / "two" / "last.pt")
    model, vocab = checkpoint.restore_model(payload)
    ids, _ = vocab.encode(corpus.read_text())
    _, val = split(ids, payload.train_config["val_frac"])
    assert len(val) > 2 * 1024  # at least 2 streams, so each rank scored part of it
    one_process = evaluate(model, val, torch.device("cpu"), prior=checkpoint.restore_prior(payload)).loss
    assert _metrics(runs / "two")[-1]["val_loss"] == pytest.approx(one_process, abs=1e-6)


def test_batch_size_must_divide_among_ranks(corpus, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "charrnn", "train", str(corpus), "--out", str(tmp_path / "x"), "--steps", "2",
           *[a for a in COMMON if a not in ("--batch-size", "4")], "--batch-size", "3"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode != 0
    assert "must be a multiple of the number of ranks" in result.stderr
    assert not (tmp_path / "x" / "last.pt").exists()


def test_a_torchrun_rank_leaves_with_its_exit_code_and_all_its_output(trained_run, tmp_path):
    """Under torchrun (WORLD_SIZE > 1) a command ends with distributed.leave (os._exit,
    past gloo's teardown): what it printed to a pipe must still arrive, and its code."""
    from conftest import run_cli

    text = tmp_path / "t.txt"
    text.write_text(VERSE, encoding="utf-8")
    done = run_cli("eval", text, "-m", trained_run, "--json", env={"WORLD_SIZE": "2"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["chars"] > 0  # block-buffered into the pipe, then flushed
    failed = run_cli("eval", tmp_path / "missing.txt", "-m", trained_run, env={"WORLD_SIZE": "2"})
    assert failed.returncode == 1 and "missing.txt" in failed.stderr and "Traceback" not in failed.stderr


def test_leave_flushes_what_is_buffered_and_exits_with_the_code():
    script = "import sys; from charrnn.distributed import leave; sys.stdout.write('partial line'); leave(3)"
    env = {k: v for k, v in _env().items() if k != "PYTHONUNBUFFERED"}  # so stdout holds it in its buffer
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 3 and done.stdout == "partial line"

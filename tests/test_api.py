"""The Python API: the README's examples run, and the API gives what the CLI gives."""

import contextlib
import io
import json
import re

import pytest
from conftest import ROOT, VERSE
from typer.testing import CliRunner

import charrnn
from charrnn.cli import app


def test_the_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
              if "OpenAI(" not in b]  # the server's client example: tests/test_serve.py runs it against a server
    assert blocks, "the README has a Python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, "README.md", "exec"), {})
        assert "nats/char" in out.getvalue() and "<charrnn.Model 2x64 lstm" in out.getvalue()


def test_sample_and_score_equal_the_cli(trained_run):
    model = charrnn.load(trained_run, device="cpu")
    cli = CliRunner().invoke(app, ["sample", "-m", str(trained_run), "--prime", "The", "--length", "80",
                                   "--seed", "7", "--device", "cpu", "--dtype", "fp32"])
    assert cli.exit_code == 0, cli.stderr
    assert model.sample(prime="The", length=80, seed=7) == cli.stdout.rstrip("\n")
    assert "".join(model.stream("The", 80, seed=7)) == cli.stdout.rstrip("\n")[3:]
    text = VERSE * 3
    scored = model.score(text)
    (trained_run.parent / "v.txt").write_text(text)
    evaluated = CliRunner().invoke(app, ["eval", str(trained_run.parent / "v.txt"), "-m", str(trained_run), "--json",
                                         "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.stderr
    assert f'"loss": {scored.loss}' in evaluated.stdout or abs(
        __import__("json").loads(evaluated.stdout)["loss"] - scored.loss) < 1e-9


def test_eval_streams_equal_the_api_and_bad_counts_are_usage_errors(trained_run):
    model = charrnn.load(trained_run, device="cpu")
    text = VERSE * 40
    path = trained_run.parent / "streams.txt"
    path.write_text(text)
    reports = {}
    for streams in (None, 1):
        extra = [] if streams is None else ["--streams", str(streams)]
        done = CliRunner().invoke(app, ["eval", str(path), "-m", str(trained_run), "--json", "--device", "cpu", *extra])
        assert done.exit_code == 0, done.stderr
        reports[streams] = json.loads(done.stdout)
    assert reports[None]["streams"] == (len(text) - 1) // 1024 > 1 and reports[1]["streams"] == 1
    assert reports[1]["loss"] == pytest.approx(model.score(text, streams=1).loss, abs=1e-9)
    assert reports[None]["loss"] == pytest.approx(model.score(text).loss, abs=1e-9)
    assert reports[1]["loss"] != reports[None]["loss"] and reports[1]["chars"] == reports[None]["chars"]
    for bad in (0, -3, 1.5, True):
        with pytest.raises(charrnn.UsageError, match="streams"):
            model.score(text, streams=bad)
    done = CliRunner().invoke(app, ["eval", str(path), "-m", str(trained_run), "--streams", "0"])
    assert done.exit_code == 2 and "--streams" in done.stderr


def test_errors_are_charrnn_errors_and_nothing_is_printed(trained_run, tmp_path, capsys):
    with pytest.raises(charrnn.CheckpointError):
        charrnn.load(tmp_path / "nowhere")
    model = charrnn.load(trained_run)
    with pytest.raises(charrnn.DataError, match="unknown"):
        model.sample(prime="\u2603", length=5)
    with pytest.raises(charrnn.UsageError, match="temperature"):
        model.sample(length=5, temperature=-1)
    with pytest.raises(charrnn.UsageError, match="unknown setting"):
        charrnn.train(tmp_path / "x.txt", hiden_size=3)
    assert capsys.readouterr() == ("", "")


def test_public_surface_is_listed_and_documented():
    for name in ("load", "train", "Model", "EvalResult", "CharRNNError"):
        assert name in charrnn.__all__ and getattr(charrnn, name).__doc__
    assert "run directory" in charrnn.load.__doc__ and "settings" in charrnn.train.__doc__


def test_the_inference_api_does_not_import_training():
    """charrnn.infer.api, and charrnn.load with it, is inference only: what a server or a
    notebook pays for is the network, the decoder and the scorer."""
    import subprocess
    import sys

    probe = ("import sys, charrnn, charrnn.infer.api; charrnn.load; "
             "print(sorted(m for m in sys.modules if m.startswith('charrnn')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    loaded = set(eval(done.stdout))
    assert "charrnn.infer.api" in loaded and "charrnn.infer.sample" in loaded
    assert not loaded & {"charrnn.training.trainer", "charrnn.training.run", "charrnn.training.trainstate", "charrnn.training.sizing", "charrnn.training.finetune"}
    # charrnn.train is still there, imported on first use.
    done = subprocess.run([sys.executable, "-c", "import sys, charrnn; charrnn.train; print('charrnn.training.trainer' in sys.modules)"],
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.stdout.strip() == "True", done.stderr

"""charrnn viz: the page (charrnn.viz.report), its command, and the page in a real browser."""

import json
import re
import shutil
import subprocess

import pytest
import torch
from browser import chromium
from conftest import VERSE
from typer.testing import CliRunner

from charrnn.cli import app
from charrnn.viz import report

TEXT = 'He said "yes (or no)" to ROMEO.\nShe: \'never\' # no\n' * 3


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_int8_activations_round_trip():
    values = torch.tensor([[-1.0, -0.5, 0.0], [0.25, 1.0, 0.999]])
    raw = report._int8(values)
    import base64

    decoded = torch.tensor(list(base64.b64decode(raw)), dtype=torch.uint8).view(torch.int8).float().view(2, 3) / 127
    torch.testing.assert_close(decoded, values, atol=0.5 / 127, rtol=0)


# -- the command -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def viz_run(tmp_path_factory):
    """A tiny run with a few validations (and their samples)."""
    root = tmp_path_factory.mktemp("viz")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT * 30)
    result = invoke("train", corpus, "--out", root / "run", "--steps", 40, "--eval-every", 10, "--hidden-size", 16,
                    "--embedding-size", 8, "--batch-size", 4, "--seq-len", 16, "--device", "cpu", "--dtype", "fp32",
                    "--sample-length", 30, "-q")
    assert result.exit_code == 0, result.stderr
    return root / "run"


def test_viz_writes_one_self_contained_page(viz_run, tmp_path):
    out = tmp_path / "r.html"
    result = invoke("viz", viz_run, "--chars", 300, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and f"report: {out}" in result.stderr.splitlines()[-1]
    page = out.read_text()
    # Nothing is fetched: no external scripts, styles, fonts or images.
    assert not re.search(r"<(link|img|iframe)\b|\bsrc\s*=|@import|url\(", page)
    assert re.findall(r"https?://[^\s\"'<>]+", page) == ["http://www.w3.org/2000/svg"]  # a namespace name, never fetched
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1)
                      .replace("<\\/", "</"))
    records = (viz_run / "metrics.jsonl").read_text().splitlines()
    assert len(data["metrics"]) == len(records) == 4
    assert [s["step"] for s in data["samples"]] == [10, 20, 30, 40]
    assert len(data["text"]) == 300 and len(data["bits"]) == 300 and len(data["top"]) == 300
    assert "validation split" in data["source"]["text"]


def test_viz_on_a_pt_alone_needs_text_and_says_there_is_no_run_directory(viz_run, tmp_path):
    alone = tmp_path / "model.pt"
    shutil.copy(viz_run / "best.pt", alone)
    result = invoke("viz", alone, "-o", tmp_path / "a.html")
    assert result.exit_code == 2 and "--text" in result.stderr
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    result = invoke("viz", alone, "--text", text, "-o", tmp_path / "a.html")
    assert result.exit_code == 0, result.stderr
    page = (tmp_path / "a.html").read_text()
    assert '"metrics": []' in page and "no run directory" in page


def test_viz_bad_inputs_are_one_line_errors(viz_run, tmp_path):
    strange = tmp_path / "strange.txt"
    strange.write_text("Zebra \u00a7 \u2603\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [(["viz", tmp_path / "nowhere"], 1, "does not exist"),
             (["viz", viz_run, "--text", strange], 1, "--unknown skip"),
             (["viz", viz_run, "--text", empty], 1, "empty"),
             (["viz", viz_run, "-o", tmp_path / "missing" / "r.html"], 2, "does not exist"),
             (["viz", viz_run, "-o", tmp_path], 2, "is a directory"),
             (["viz", viz_run, "--chars", 0], 2, "--chars")]
    for args, code, words in cases:
        result = invoke(*args)
        assert result.exit_code == code, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and words in lines[-1] and "--debug" not in result.stderr, (args, lines)
    assert "\u00a7" in invoke("viz", viz_run, "--text", strange).stderr  # the unknown characters are named
    skipped = invoke("viz", viz_run, "--text", strange, "--unknown", "skip", "-o", tmp_path / "s.html")
    assert skipped.exit_code == 0, skipped.stderr


def test_samples_are_recorded_at_each_validation_and_trimmed_on_resume(viz_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(viz_run, run)
    lines = (run / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30, 40]
    assert all(len(json.loads(line)["text"]) == 30 for line in lines)
    # a run killed after a validation its last.pt never saw: that sample goes on resume
    (run / "samples.jsonl").write_text("\n".join(lines) + '\n{"step": 50, "text": "later"}\n')
    result = invoke("train", "--resume", run, "--steps", 50, "-q")
    assert result.exit_code == 0, result.stderr
    steps = [json.loads(line)["step"] for line in (run / "samples.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40, 50]


# -- in a real browser ------------------------------------------------------------------------

@pytest.mark.skipif(chromium() is None, reason="no Chromium here (apt-get install chromium; .ci/run installs it)")
def test_the_page_renders_in_headless_chromium(viz_run, tmp_path):
    out = tmp_path / "report.html"
    assert invoke("viz", viz_run, "--chars", 400, "-o", out).exit_code == 0
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # no network: any fetch would fail
             "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom, dom[-2000:]  # every script ran to its end
    surprisal = re.search(r'id="surprise-text"[^>]*>(.*?)</div>', dom, re.S).group(1)
    assert len(re.findall(r'class="c s', surprisal)) == 400
    assert len(re.findall(r"data-top=", surprisal)) == 400  # hover data on every character
    units = re.findall(r'<option value="(\d+):(\d+)"', dom)
    assert len(units) == 2 * 16 and ("1", "15") in units
    records = len((viz_run / "metrics.jsonl").read_text().splitlines())
    step_chart = re.search(r'data-title="loss against step"(.*?)</svg>', dom, re.S).group(1)
    assert len(re.findall(r'class="pt val"', step_chart)) == records
    assert len(re.findall(r'class="unit"', dom)) == 3 * 2 * 16  # a point per unit in each gate's scatter
    training = re.search(r'<div id="train">(.*?)<h2 id="surprisal">', dom, re.S).group(1)
    assert len(re.findall(r'<pre class="vsample">', training)) == 4
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1600", out.as_uri()],
                   capture_output=True, timeout=120)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a rendered page, not a blank one


def test_tensorboard_events_read_back_as_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is a test extra: pip install -e '.[test]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    corpus = tmp_path / "c.txt"
    corpus.write_text(VERSE * 20)
    result = invoke("train", corpus, "--out", tmp_path / "run", "--tensorboard", tmp_path / "tb", "--steps", 30,
                    "--eval-every", 10, "--hidden-size", 16, "--embedding-size", 8, "--batch-size", 4, "--seq-len", 16,
                    "--device", "cpu", "--sample-length", 20, "-q")
    assert result.exit_code == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for key in ("train_loss", "val_loss", "val_bpc", "best_val_loss", "lr", "grad_norm", "chars_per_s", "elapsed_s", "epoch"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert [step for step, _ in logged] == [r["step"] for r in records], key
        for (_, value), record in zip(logged, records):
            assert value == pytest.approx(record[key], rel=1e-6), key  # float32 in the event file
    texts = events.Tensors("sample/text_summary")
    assert [t.step for t in texts] == [10, 20, 30]
    samples = [json.loads(line)["text"] for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert texts[0].tensor_proto.string_val[0].decode().replace("\n    ", "\n").strip() == samples[0].strip()

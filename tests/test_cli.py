import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, VERSE, run_cli
from typer.testing import CliRunner

from charrnn.cli import app
from charrnn.config import ModelConfig, TrainConfig


def invoke(*args, input=None):
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.mark.parametrize("command", [[], ["train"], ["sample"], ["eval"]])
def test_every_command_has_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage" in result.stdout


def test_every_config_field_has_a_train_flag_showing_its_help_and_default():
    """The flags are derived from the fields (charrnn.config.setting): one declaration each."""
    import dataclasses

    flat = re.sub(r"[\s│]+", " ", invoke("train", "--help").stdout)  # undo rich's wrapping inside its boxes
    for cls in (ModelConfig, TrainConfig):
        for field in dataclasses.fields(cls):
            meta = field.metadata
            flag = (meta["flags"] or ("--" + field.name.replace("_", "-"),))[0].split("/")[0]
            shown = meta["show"] if meta["show"] is not None else str(field.default)
            help_start = " ".join(meta["help"].split()[:3])
            assert re.search(rf"{re.escape(flag)}\b.*?{re.escape(help_start)}.*?\[default: \(?{re.escape(shown)}\)?\]",
                             flat), field.name


def test_a_flag_reaches_the_run_as_its_field(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(VERSE * 10)
    result = invoke("train", corpus, "--out", tmp_path / "r", "--steps", 2, "--hidden-size", 8, "--embedding-size", 8,
                    "--batch-size", 2, "-t", 8, "--lr", 0.005, "--stateful", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    resolved = (tmp_path / "r" / "config.toml").read_text()
    for line in ("hidden_size = 8", "seq_len = 8", "learning_rate = 0.005", "stateless = false", "batch_size = 2"):
        assert line in resolved


def test_sample_prints_exactly_length_characters_after_the_prime(trained_run):
    result = invoke("sample", "--checkpoint", trained_run, "--prime", "The ", "--length", 500,
                    "--temperature", 0.7, "--seed", 1)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("The ") and len(result.stdout) == 4 + 500
    again = invoke("sample", "--checkpoint", trained_run, "--prime", "The ", "--length", 500,
                   "--temperature", 0.7, "--seed", 1)
    assert again.stdout == result.stdout
    assert "checkpoint" not in result.stdout and result.stderr == ""


def test_sample_uses_most_recent_run_and_says_so(trained_run, monkeypatch):
    monkeypatch.chdir(trained_run.parent.parent)
    result = invoke("sample", "--length", 20, "--seed", 3)
    assert result.exit_code == 0 and len(result.stdout) == 20
    assert "most recent run" in result.stderr and str(trained_run.name) in result.stderr


def test_sample_json_and_batches(trained_run):
    result = invoke("sample", "-m", trained_run, "--length", 30, "--num-samples", 3, "--seed", 2, "--json")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["sample"] for r in records] == [0, 1, 2]
    assert all(len(r["text"]) == 30 for r in records)
    assert len({r["text"] for r in records}) == 3


def test_sample_prime_from_stdin(trained_run):
    result = invoke("sample", "-m", trained_run, "--prime", "-", "--length", 10, "--seed", 2, input="Voilà ")
    assert result.exit_code == 0 and result.stdout.startswith("Voilà ") and len(result.stdout) == 16


def test_eval_json_fields(trained_run, tmp_path):
    held_out = tmp_path / "held.txt"
    held_out.write_text(VERSE)
    result = invoke("eval", held_out, "-m", trained_run, "--json")
    record = json.loads(result.stdout)
    assert record["chars"] == len(VERSE) - 1
    assert record["bpc"] == pytest.approx(record["loss"] / 0.6931471805599453)
    assert record["perplexity"] > 1 and record["unknown_dropped"] == 0
    line = invoke("eval", held_out, "-m", trained_run)
    assert line.stdout.startswith("chars ") and len(line.stdout.splitlines()) == 1


def test_eval_skips_unknown_characters_and_counts_them(trained_run, tmp_path):
    held_out = tmp_path / "held.txt"
    held_out.write_text(VERSE + "§§§")
    assert invoke("eval", held_out, "-m", trained_run).exit_code == 1
    record = json.loads(invoke("eval", held_out, "-m", trained_run, "--unknown", "skip", "--json").stdout)
    assert record["unknown_dropped"] == 3


def test_train_writes_run_directory_and_nothing_on_stdout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "poem.txt"
    corpus.write_text(VERSE * 10)
    args = ["train", corpus, "--hidden-size", 16, "--batch-size", 2, "--seq-len", 8, "--steps", 4,
            "--eval-every", 2, "--device", "cpu", "--dtype", "fp32"]
    first = invoke(*args)
    assert first.exit_code == 0, first.stderr
    assert first.stdout == ""
    run = tmp_path / "runs" / "poem"
    assert {p.name for p in run.iterdir()} == {"config.toml", "metrics.jsonl", "last.pt", "best.pt", "samples.jsonl"}
    second = invoke(*args, "--json")  # never overwrites the first run
    assert json.loads(second.stdout)["run_dir"] == str(Path("runs") / "poem-2")
    assert invoke(*args, "--out", run).exit_code == 2  # --out holding a run is refused


@pytest.mark.parametrize("cell", ["gru", "rnn", "peephole", "layernorm"])
@pytest.mark.parametrize("stateless", [False, True])
def test_every_cell_trains_samples_and_evaluates(tmp_path, cell, stateless):
    """The cell is stored in the checkpoint: sample and eval need no --cell."""
    corpus = tmp_path / "poem.txt"
    corpus.write_text(VERSE * 10)
    extra = ["--stateless"] if stateless else []
    if cell in ("peephole", "layernorm"):
        extra += ["--recurrent-dropout", 0.2]
    trained = invoke("train", corpus, "--cell", cell, "--hidden-size", 16, "--batch-size", 2, "--seq-len", 8,
                     "--steps", 4, "--eval-every", 2, "--device", "cpu", "--out", tmp_path / "run", "--json", *extra)
    assert trained.exit_code == 0, trained.stderr
    assert json.loads(trained.stdout)["best_val_loss"] > 0
    sampled = invoke("sample", "-m", tmp_path / "run", "--length", 40, "--seed", 3, "--prime", "The")
    assert sampled.exit_code == 0, sampled.stderr
    assert len(sampled.stdout.rstrip("\n")) == len("The") + 40
    evaluated = invoke("eval", corpus, "-m", tmp_path / "run" / "best.pt", "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["chars"] == len(VERSE * 10) - 1
    if stateless:  # the report, once per cell
        shown = invoke("viz", tmp_path / "run", "--chars", 100)
        assert shown.exit_code == 0, shown.stderr
        page = (tmp_path / "run" / "report.html").read_text()
        assert ('"saturation": [{}, {}]' in page) == (cell == "rnn")  # no gates to show and f'"cell": "{cell}"' in page


def _one_line_error(result, code):
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_bad_corpus_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00")
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / "short.txt").write_text("too short\n")
    cases = {
        str(tmp_path / "missing.txt"): "does not exist",
        str(tmp_path / "empty.txt"): "is empty",
        str(tmp_path / "image.png"): "binary",
        str(tmp_path / "latin1.txt"): "not valid UTF-8: first bad byte at offset 3",
        str(tmp_path / "short.txt"): "shorter than one batch",
    }
    for path, message in cases.items():
        result = invoke("train", path, "--out", tmp_path / "run", "--device", "cpu")
        _one_line_error(result, 1)
        assert message in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_sample_inputs(trained_run, tmp_path):
    _one_line_error(invoke("sample", "-m", trained_run, "--prime", "Zebra§"), 1)
    _one_line_error(invoke("sample", "-m", trained_run, "--temperature", -1), 2)
    _one_line_error(invoke("sample", "-m", trained_run, "--top-p", 2), 2)
    _one_line_error(invoke("sample", "-m", trained_run, "--length", -5), 2)
    cut = tmp_path / "cut.pt"
    cut.write_bytes((trained_run / "last.pt").read_bytes()[:5000])
    _one_line_error(invoke("sample", "-m", cut), 1)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    _one_line_error(invoke("sample", "-m", notes), 1)
    _one_line_error(invoke("eval", notes, "-m", notes), 1)
    _one_line_error(invoke("sample", "-m", tmp_path / "nowhere.pt"), 1)


def test_bad_config_values_are_usage_errors(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(VERSE * 10)
    _one_line_error(invoke("train", corpus, "--batch-size", 0), 2)
    _one_line_error(invoke("train", corpus, "--time", "ten minutes"), 2)
    config = tmp_path / "x.toml"
    config.write_text("[model]\nhiden_size = 3\n")
    result = invoke("train", corpus, "--config", config)
    _one_line_error(result, 2)
    assert "hidden_size" in result.stderr  # lists the valid keys


def test_huge_and_edge_values_of_sample_eval_and_gradients(trained_run, tmp_path):
    """Each of these reached the catch-all (MemoryError, OverflowError, a float overflow)."""
    text = tmp_path / "t.txt"
    text.write_text(VERSE)
    before = {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()}
    for args in (["sample", "-m", trained_run, "--num-samples", 10**11],
                 ["sample", "-m", trained_run, "--num-samples", 10**23],
                 ["eval", text, "-m", trained_run, "--dynamic", "--step-size", 1e308],
                 ["eval", text, "-m", trained_run, "--dynamic", "--segment", 10**23],
                 ["gradients", trained_run / "best.pt", "--text", text, "--windows", 10**23]):
        result = invoke(*args)
        _one_line_error(result, 2)
        assert "must be" in result.stderr and "--debug" not in result.stderr
    assert before == {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()}


@pytest.mark.parametrize("failure", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] "
                                     "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB")])
def test_running_out_of_memory_is_its_own_one_line_error(trained_run, monkeypatch, failure):
    import charrnn.infer.api

    def refuse(*args, **kwargs):
        raise failure
        yield

    monkeypatch.setattr(charrnn.infer.api, "generate", refuse)  # the decoder the API (and so the CLI) runs
    result = invoke("sample", "-m", trained_run, "--seed", 1)
    _one_line_error(result, 1)
    assert "not enough memory" in result.stderr and "--batch-size" in result.stderr


def test_steps_0_means_no_step_limit_and_the_stop_line_says_what_applies(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(VERSE * 10)
    result = invoke("train", corpus, "--out", tmp_path / "r", "--steps", 0, "--epochs", 0.05, "--device", "cpu",
                    "--hidden-size", 8, "--embedding-size", 8, "--batch-size", 2, "--seq-len", 8, "-q")
    assert result.exit_code == 0, result.stderr
    assert "stop: 0.05 epochs\n" in result.stderr
    assert "0 = no step limit" in " ".join(invoke("train", "--help").stdout.replace("│", "").split())


def test_a_directory_as_config_file(tmp_path):
    result = invoke("train", tmp_path, "--config", tmp_path)
    _one_line_error(result, 2)
    assert "is a directory" in result.stderr


def test_usage_errors_from_the_parser_are_one_line_exit_2():
    result = run_cli("sample", "--length", "many")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_python_m_charrnn_and_broken_pipe(trained_run):
    proc = subprocess.run(f"'{sys.executable}' -m charrnn sample -m '{trained_run}' --length 100000 --seed 1 | head -c 100",
                          shell=True, capture_output=True, timeout=120, cwd=ROOT)
    assert len(proc.stdout) == 100  # bytes
    assert proc.stderr == b""


def test_version():
    assert run_cli("--version").stdout.startswith("charrnn ")


def test_help_shows_no_value_after_on_off_flags():
    for command in ("train", "sample", "eval", "viz"):
        shown = invoke(command, "--help").stdout
        assert "--quiet" in shown or "--json" in shown or "--open" in shown
        assert "<bool>" not in shown, command


def test_shell_completion_completes_commands_and_flags():
    env = {"_CHARRNN_COMPLETE": "complete_bash", "COMP_WORDS": "charrnn tr", "COMP_CWORD": "1"}
    assert run_cli(env=env).stdout.split() == ["train"]
    env.update(COMP_WORDS="charrnn sample --tem", COMP_CWORD="2")
    assert run_cli(env=env).stdout.split() == ["--temperature"]


def test_bf16_on_a_cpu_that_cannot_run_it_is_a_one_line_error(trained_run, tmp_path):
    """--dtype bf16 runs where the CPU has AVX-512; elsewhere oneDNN refuses the LSTM, and
    that is said in charrnn's words, not oneDNN's."""
    text = tmp_path / "t.txt"
    text.write_text(VERSE)
    from charrnn.device import cpu_runs_bf16_lstm

    result = invoke("eval", text, "-m", trained_run, "--dtype", "bf16", "--device", "cpu")
    if cpu_runs_bf16_lstm():
        assert result.exit_code == 0, result.stderr
        return
    _one_line_error(result, 1)
    assert "AVX-512" in result.stderr and "--dtype fp32" in result.stderr and "primitive" not in result.stderr

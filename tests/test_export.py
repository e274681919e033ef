"""`charrnn export`: the ONNX graph gives PyTorch's numbers for every cell, the file alone
is enough to sample, and bad input is a one-line error that leaves the checkpoint as it was."""

import hashlib
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import charrnn
from charrnn.cli import app
from charrnn.data import Vocab
from charrnn.export import OnnxModel, build_onnx

from conftest import CELLS, make_model, shaken, tiny_configs, corpus_of, VERSE
from charrnn.run import trainer_for

ort = pytest.importorskip("onnxruntime")
ALPHABET = "\nabcdefghijklmnopqrs"


class Stand:
    """What build_onnx reads of a charrnn.api.Model."""

    def __init__(self, network):
        self.network, self.vocab, self.path = network, Vocab(ALPHABET), "x.pt"


def network_for(cell):
    network = shaken(make_model(cell, vocab_size=len(ALPHABET)))
    with torch.no_grad():
        network.start_state.normal_(0, 0.5)  # a learned start state, not zeros
    return network


@pytest.mark.parametrize("cell", CELLS)
def test_onnxruntime_gives_pytorchs_logits_and_state_for_every_cell(cell):
    network = network_for(cell)
    session = ort.InferenceSession(build_onnx(Stand(network)))
    names = [i.name for i in session.get_inputs()][1:]
    for batch in (1, 8):
        x = torch.randint(0, len(ALPHABET), (batch, 101))
        with torch.no_grad():
            state = network.init_state(batch)
            ours = {k: v.numpy() for k, v in zip(names, state)}
            for start, length in ((0, 1), (1, 100)):  # one step, then 100 with the state carried
                chunk = x[:, start : start + length]
                logits, state = network(chunk, state)
                out = session.run(None, {"ids": chunk.numpy(), **ours})
                assert np.abs(out[0] - logits.numpy()).max() < 1e-4
                for got, want in zip(out[1:], state):
                    assert np.abs(got - want.numpy()).max() < 1e-4
                ours = dict(zip(names, out[1:]))


@pytest.mark.parametrize("cell", CELLS)
def test_greedy_continuations_of_200_characters_are_identical(cell):
    network = network_for(cell)
    session = ort.InferenceSession(build_onnx(Stand(network)))
    names = [i.name for i in session.get_inputs()][1:]
    prime = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits, state = network(prime)
        feeds = {"ids": prime.numpy(), **{k: v.numpy() for k, v in zip(names, network.init_state(1))}}
        out = session.run(None, feeds)
        torch_ids, onnx_ids = [], []
        t_logits, o_logits, o_state = logits[0, -1], out[0][0, -1], out[1:]
        for _ in range(200):
            t_next, o_next = int(t_logits.argmax()), int(o_logits.argmax())
            torch_ids.append(t_next)
            onnx_ids.append(o_next)
            t_out, state = network(torch.tensor([[t_next]]), state)
            t_logits = t_out[0, -1]
            out = session.run(None, {"ids": np.array([[o_next]]), **dict(zip(names, o_state))})
            o_logits, o_state = out[0][0, -1], out[1:]
    assert torch_ids == onnx_ids and len(set(torch_ids)) > 1


def test_the_metadata_is_enough_to_sample(tmp_path):
    network = network_for("lstm")
    path = tmp_path / "m.onnx"
    path.write_bytes(build_onnx(Stand(network)))
    import onnx

    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert meta["charrnn.vocabulary"] == list(ALPHABET)
    assert np.allclose(meta["charrnn.start_state"]["c"], network.start_state[1].detach().numpy(), atol=1e-6)
    assert meta["charrnn.model_config"]["cell"] == "lstm" and meta["charrnn.state_inputs"] == ["h", "c"]
    model = OnnxModel(path)
    text = "".join(model.stream(model.encode("abc"), 50, 0.0, seed=0))
    with torch.no_grad():  # greedy from the learned start state, as charrnn reads
        ids = torch.tensor([[1, 2, 3]])
        logits, state = network(ids)
        expected = ""
        for _ in range(50):
            nxt = int(logits[0, -1].argmax())
            expected += ALPHABET[nxt]
            logits, state = network(torch.tensor([[nxt]]), state)
    assert text == expected
    seeded = ["".join(model.stream(model.encode("a"), 80, 1.0, seed=9)) for _ in range(2)]
    assert seeded[0] == seeded[1] != "".join(model.stream(model.encode("a"), 80, 1.0, seed=10))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A tiny trained run without the start mix, so both sides read the same way."""
    run_dir = tmp_path_factory.mktemp("export") / "runs" / "plain"
    model_config, train_config = tiny_configs(train=dict(start_mix=False))
    trainer_for(corpus_of(VERSE * 20), model_config, train_config, run_dir).run()
    return run_dir


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_charrnn_sample_onnx_writes_what_charrnn_sample_writes_when_greedy(plain_run, tmp_path):
    onnx_path = tmp_path / "plain.onnx"
    done = invoke("export", plain_run, "-o", onnx_path)
    assert done.exit_code == 0, done.stderr
    assert "export:" in done.stderr and onnx_path.stat().st_size > 10_000
    args = ["--prime", "The ", "--length", 200, "--temperature", 0, "--seed", 1]
    from_torch = invoke("sample", "-m", plain_run, *args, "--device", "cpu", "--dtype", "fp32")
    from_onnx = invoke("sample", "--onnx", onnx_path, *args)
    assert from_onnx.exit_code == 0, from_onnx.stderr
    assert from_onnx.stdout.rstrip("\n") == from_torch.stdout.rstrip("\n")


def test_export_errors_are_one_line_and_the_checkpoint_is_never_changed(plain_run, tmp_path):
    checkpoint = plain_run / "best.pt"
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(checkpoint.read_bytes()[:5000])
    cases = [
        (("export", damaged, "-o", tmp_path / "x.onnx"), 1, "unreadable"),
        (("export", plain_run, "-o", tmp_path / "no" / "such" / "dir" / "x.onnx"), 1, "x.onnx"),
        (("export", plain_run, "-o", tmp_path / "x.txt"), 2, "name an .onnx or an .html file"),
        (("export", plain_run), 2, "give one of"),
        (("export", plain_run, "--web", tmp_path / "w", "--weights", "int4"), 2, "--weights must be fp16 or fp32"),
        (("sample", "--onnx", tmp_path / "missing.onnx"), 1, "missing.onnx"),
        (("sample", "--onnx", damaged), 1, "is not a charrnn ONNX export"),
    ]
    for args, code, words in cases:
        result = invoke(*args)
        assert result.exit_code == code, (args, result.stderr)
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "x.onnx").exists() and not list(tmp_path.glob("*.tmp*"))
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before

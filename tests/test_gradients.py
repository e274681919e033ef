import json

import pytest
import torch
from conftest import VERSE

from charrnn.config import ModelConfig
from charrnn.model.network import CharRNN
from charrnn.viz.gradients import gradient_reach, table


def _model(cell, scale=1.0):
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(cell=cell, hidden_size=16, num_layers=1, embedding_size=8, dropout=0.0), 20)
    with torch.no_grad():
        model.layers[0].weight_hh_l0.mul_(scale)
    return model


def test_reach_matches_autograd_for_one_step_back():
    """k = 1 equals the gradient of the last loss w.r.t. the state fed into the last step."""
    model = _model("rnn")
    ids = torch.randint(0, 20, (200,))
    gen = torch.Generator().manual_seed(3)
    norms = gradient_reach(model, ids, span=5, windows=4, generator=gen)
    starts = torch.randint(0, 200 - 6, (4, 1), generator=torch.Generator().manual_seed(3))
    window = ids[starts + torch.arange(7)]
    _, state = model(window[:, :5])
    h = state[0].detach().requires_grad_()
    logits, _ = model(window[:, 5:6], (h,))
    torch.nn.functional.cross_entropy(logits[:, -1], window[:, 6]).backward()
    assert norms[0] == pytest.approx(h.grad[-1].norm(dim=-1).mean().item(), rel=1e-5)


def test_contractive_rnn_gradients_vanish():
    norms = gradient_reach(_model("rnn", scale=0.3), torch.randint(0, 20, (500,)), span=30, windows=8)
    assert len(norms) == 30 and norms[0] > 0
    assert norms[-1] < 1e-6 * norms[0]


def test_cli_prints_table_and_json(trained_run, tmp_path):
    from typer.testing import CliRunner

    from charrnn.cli import app

    text = tmp_path / "t.txt"
    text.write_text(VERSE * 3)
    result = CliRunner().invoke(app, ["gradients", str(trained_run), "--text", str(text), "--span", "20",
                                      "--windows", "4"])
    assert result.exit_code == 0 and result.stdout.splitlines()[0].split()[0] == "k"
    result = CliRunner().invoke(app, ["gradients", str(trained_run), "--text", str(text), "--span", "20",
                                      "--windows", "4", "--json"])
    curves = json.loads(result.stdout)
    assert [len(v) for v in curves.values()] == [20]
    assert "k" in table(curves)

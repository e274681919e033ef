"""Hand-written cells against nn.LSTM, a hand-computed peephole example, recurrent dropout."""

import pytest
import torch
from torch import nn

from charrnn.config import ModelConfig
from charrnn.model.cells import HandLSTM
from charrnn.model.network import CharRNN


def _pair(**kwargs):
    torch.manual_seed(0)
    reference = nn.LSTM(5, 7, 1, batch_first=True)
    cell = HandLSTM(5, 7, **kwargs)
    cell.load_state_dict(reference.state_dict(), strict=False)
    return reference, cell


@pytest.mark.parametrize("kwargs", [dict(peephole=True), dict(layer_norm=True)])
def test_hand_written_cell_equals_nn_lstm(kwargs):
    """Peephole weights at 0 / normalisation disabled: outputs and gradients equal nn.LSTM's."""
    reference, cell = _pair(**kwargs)
    if cell.layer_norm:  # disable the normalisation, keep everything else of the layernorm cell
        cell.norm_x = cell.norm_h = cell.norm_c = nn.Identity()
    x = torch.randn(3, 9, 5, requires_grad=True)
    state = (torch.randn(1, 3, 7), torch.randn(1, 3, 7))
    out_ref, (h_ref, c_ref) = reference(x, state)
    out, (h, c) = cell(x, state)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(c, c_ref, rtol=0, atol=1e-5)
    grad_ref = torch.autograd.grad((out_ref.square().sum() + c_ref.sum()), [x, reference.weight_hh_l0])
    grad = torch.autograd.grad((out.square().sum() + c.sum()), [x, cell.weight_hh_l0])
    for a, b in zip(grad, grad_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_peephole_two_steps_by_hand():
    """H = 1, zero weights: each gate is sigma(bias + peephole * cell), so every term shows."""
    cell = HandLSTM(1, 1, peephole=True)
    with torch.no_grad():
        for p in (cell.weight_ih_l0, cell.weight_hh_l0, cell.bias_hh_l0):
            p.zero_()
        cell.bias_ih_l0.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))  # b_i, b_f, b_C, b_o
        cell.peephole_i.fill_(0.5)
        cell.peephole_f.fill_(-0.25)
        cell.peephole_o.fill_(2.0)
    sig, tanh = torch.sigmoid, torch.tanh
    c = torch.tensor(0.8)  # C_0
    expected = []
    for _ in range(2):
        f = sig(0.2 + -0.25 * c)  # forget gate peeks at C_{t-1}
        i = sig(0.1 + 0.5 * c)  # input gate peeks at C_{t-1}
        c = f * c + i * tanh(torch.tensor(0.3))
        o = sig(0.4 + 2.0 * c)  # output gate peeks at the new C_t
        expected.append(o * tanh(c))
    out, (h, c_out) = cell(torch.zeros(1, 2, 1), (torch.zeros(1, 1, 1), torch.full((1, 1, 1), 0.8)))
    torch.testing.assert_close(out.flatten(), torch.stack(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(c_out.flatten(), c.reshape(1), rtol=0, atol=1e-6)


def test_layer_norm_changes_the_cell():
    reference, cell = _pair(layer_norm=True)
    x = torch.randn(2, 4, 5)
    state = (torch.zeros(1, 2, 7), torch.zeros(1, 2, 7))
    assert not torch.allclose(cell(x, state)[0], reference(x, state)[0], atol=1e-3)


def test_layer_norm_cell_follows_its_equations():
    """gates = LN_x(W_ih x_t) + LN_h(W_hh h_{t-1}) + b, h_t = o * tanh(LN_c(C_t)), written out
    with random gains and shifts (the bias is folded into LN_x's shift inside the cell)."""
    torch.manual_seed(3)
    cell = HandLSTM(4, 6, layer_norm=True)
    with torch.no_grad():
        for norm in (cell.norm_x, cell.norm_h, cell.norm_c):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 5, 4)
    h, c = torch.randn(2, 6), torch.randn(2, 6)
    out, (h_last, c_last) = cell(x, (h[None], c[None]))
    ln = torch.nn.functional.layer_norm
    bias = cell.bias_ih_l0 + cell.bias_hh_l0
    with torch.no_grad():
        for t in range(5):
            gates = (ln(x[:, t] @ cell.weight_ih_l0.T, (24,), cell.norm_x.weight, cell.norm_x.bias)
                     + ln(h @ cell.weight_hh_l0.T, (24,), cell.norm_h.weight, cell.norm_h.bias) + bias)
            i, f, g, o = gates.split(6, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(ln(c, (6,), cell.norm_c.weight, cell.norm_c.bias))
            torch.testing.assert_close(out[:, t], h, rtol=0, atol=1e-5)
    torch.testing.assert_close(c_last[0], c, rtol=0, atol=1e-5)


def test_recurrent_dropout_masks():
    cell = HandLSTM(3, 50, recurrent_dropout=0.5, peephole=True)
    state = (torch.ones(1, 4, 50), torch.zeros(1, 4, 50))
    x = torch.randn(4, 6, 3)
    torch.manual_seed(1)
    cell(x, state)
    first = cell.last_mask
    assert first.shape == (4, 50)  # one mask per sequence, reused at every step
    assert set(first.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(first[0], first[1])  # different across the sequences of a batch
    cell(x, state)
    assert not torch.equal(cell.last_mask, first)  # and across calls
    cell.eval()
    out_a, _ = cell(x, state)
    assert cell.last_mask is None  # off in eval mode
    assert torch.equal(out_a, cell(x, state)[0])


def test_mask_is_fixed_within_a_sequence():
    """With the mask drawn once, the output equals running the cell with h scaled by that mask."""
    torch.manual_seed(2)
    cell = HandLSTM(3, 8, recurrent_dropout=0.3, layer_norm=True)
    x = torch.randn(2, 5, 3)
    state = (torch.randn(1, 2, 8), torch.randn(1, 2, 8))
    out, _ = cell(x, state)
    mask = cell.last_mask
    cell.eval()
    with torch.no_grad():
        h, c = state[0][0], state[1][0]
        steps = []
        for t in range(5):  # re-run step by step, masking h with the same mask each time
            cell.recurrent_dropout = 0.0
            y, (h1, c1) = cell(x[:, t : t + 1], ((h * mask)[None], c[None]))
            h, c = h1[0], c1[0]
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, dim=1), out.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cell", ["peephole", "layernorm"])
def test_model_with_hand_written_cells_runs_chunked(cell):
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(cell=cell, hidden_size=16, num_layers=2, embedding_size=8, dropout=0.0), 12).eval()
    x = torch.randint(0, 12, (2, 20))
    whole, _ = model(x)
    first, state = model(x[:, :7])
    second, _ = model(x[:, 7:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=0, atol=1e-5)


def test_init_choices():
    def layer0(init):
        torch.manual_seed(0)
        return CharRNN(ModelConfig(hidden_size=8, num_layers=1, embedding_size=4, init=init, forget_bias=2.0), 5).layers[0]

    ortho = layer0("orthogonal")
    for block in ortho.weight_hh_l0.detach().split(8):
        torch.testing.assert_close(block @ block.T, torch.eye(8), rtol=0, atol=1e-5)
    uniform = layer0("uniform")
    assert uniform.weight_ih_l0.abs().max() <= 0.08
    for layer in (ortho, uniform):
        total = layer.bias_ih_l0 + layer.bias_hh_l0
        assert torch.all(total[8:16] == 2.0)  # the forget-gate bias, after any init


def test_embedding_dropout_only_in_training():
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(hidden_size=8, num_layers=1, embedding_size=4, dropout=0.0,
                                embedding_dropout=0.5), 5)
    x = torch.randint(0, 5, (2, 6))
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])

"""The network: chunked == whole, the start state, dropouts and weight drop, purity."""

import dataclasses

import pytest
import torch
from conftest import VERSE, make_model, shaken

from charrnn.config import ModelConfig
from charrnn.model.network import CharRNN


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_chunked_forward_with_carried_state_equals_whole(cell):
    model = make_model(cell)
    x = torch.randint(0, 20, (3, 40))
    whole, whole_state = model(x)
    state, pieces = None, []
    for start in range(0, 40, 7):
        logits, state = model(x[:, start : start + 7], state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=1e-5)
    for a, b in zip(state, whole_state):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_forget_gate_bias_starts_at_one():
    model = make_model("lstm")
    hidden = 24
    for layer in range(2):
        total = model.layers[layer].bias_ih_l0 + model.layers[layer].bias_hh_l0
        assert torch.all(total[hidden : 2 * hidden] == 1.0)
        assert not torch.all(total[:hidden] == 1.0)


def test_dropout_keeps_the_expected_fraction_and_scales():
    from charrnn.model.network import dropout

    torch.manual_seed(0)
    x = torch.ones(200, 500, requires_grad=True)
    y = dropout(x, 0.3)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient passes through the same mask
    assert dropout(x, 0.0) is x


def test_dropout_is_off_in_eval_mode():
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(hidden_size=16, num_layers=2, embedding_size=8, dropout=0.5), 10).eval()
    x = torch.randint(0, 10, (2, 7))
    assert torch.equal(model(x)[0], model(x)[0])
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])


# -- weight drop and the learned start state ----------------------------------------------

@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole", "layernorm"])
def test_weight_drop_is_one_mask_per_call_and_equals_the_layer_run_with_dropped_weights(cell):
    torch.manual_seed(0)
    config = ModelConfig(cell=cell, hidden_size=16, num_layers=2, embedding_size=8, dropout=0.0, weight_drop=0.5)
    model = shaken(CharRNN(config, 12)).train()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 12, (3, 9))
    logits, state = model(x)
    masks = model.last_weight_masks
    assert len(masks) == 2
    for layer, mask in zip(model.layers, masks):
        # One (gates*H, H) mask: the same dropped connections at every step and for every sequence.
        assert mask.shape == layer.weight_hh_l0.shape
        assert 0.3 < (mask == 0).float().mean() < 0.7
    # The same network, plain, with W_hh * mask: the same logits and state.
    reference = CharRNN(dataclasses.replace(config, weight_drop=0.0), 12).train()
    reference.load_state_dict(trained)
    with torch.no_grad():
        for layer, mask in zip(reference.layers, masks):
            layer.weight_hh_l0.mul_(mask)
    expected, expected_state = reference(x)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(state, expected_state))
    # The trained weights are untouched, and the gradient reaches them through the mask.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.items())
    logits.sum().backward()
    grad = model.layers[0].weight_hh_l0.grad
    assert torch.all(grad[masks[0] == 0] == 0) and grad.abs().sum() > 0
    # A second call draws a new mask.
    model(x)
    assert not torch.equal(model.last_weight_masks[0], masks[0])


def test_weight_drop_is_off_in_eval_mode():
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=16, num_layers=2, embedding_size=8, dropout=0.0, weight_drop=0.5)
    model = CharRNN(config, 12).eval()
    plain = CharRNN(dataclasses.replace(config, weight_drop=0.0), 12).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randint(0, 12, (2, 7))
    assert torch.equal(model(x)[0], plain(x)[0])
    assert model.last_weight_masks == []


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_sequence_starts_from_the_learned_start_state(cell):
    model = shaken(make_model(cell))
    x = torch.randint(0, 20, (3, 5))
    start = model.init_state(3)
    for s, learned in zip(start, model.start_state):
        assert torch.equal(s, learned[:, None, :].expand_as(s))
    assert torch.equal(model(x)[0], model(x, start)[0])
    # restart() puts the start state into the chosen streams only.
    carried = tuple(torch.randn_like(s) for s in start)
    mixed = model.restart(carried, torch.tensor([True, False, True]))
    for s, c, s0 in zip(mixed, carried, start):
        assert torch.equal(s[:, 1], c[:, 1]) and torch.equal(s[:, 0], s0[:, 0]) and torch.equal(s[:, 2], s0[:, 2])


def test_forward_is_pure_with_a_start_mix_stored(trained_run):
    """A model loaded with a start mix gives the network's logits whether or not the start
    state is passed in: the mix is the scorer's and the decoder's, not forward's."""
    from charrnn.store import checkpoint

    payload = checkpoint.load(trained_run / "best.pt")
    assert payload.start_mix is not None
    model, vocab = checkpoint.restore_model(payload)
    assert not model.training
    x, _ = vocab.encode((VERSE * 2)[:64])
    x = x.long().view(4, 16)
    logits, state = model(x)
    given, given_state = model(x, model.init_state(4))
    assert torch.equal(logits, given) and all(torch.equal(a, b) for a, b in zip(state, given_state))
    assert not torch.allclose(logits.logsumexp(-1), torch.zeros(4, 16))  # logits, not log-probabilities

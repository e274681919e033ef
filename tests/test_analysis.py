"""What charrnn viz computes (charrnn.viz.analysis), against independent recomputation, and
its surprisal against eval's."""

import pytest
import torch
import torch.nn.functional as F
from conftest import CELLS, VERSE

from charrnn.config import ModelConfig
from charrnn.model.network import LSTM_CELLS, CharRNN
from charrnn.viz import analysis


def _model(cell, seed=0):
    torch.manual_seed(seed)
    model = CharRNN(ModelConfig(cell=cell, hidden_size=12, num_layers=2, embedding_size=6, dropout=0.0), 40)
    with torch.no_grad():  # a start state and peepholes away from zero, so they are tested too
        model.start_state.normal_(0, 0.5)
        for name, p in model.named_parameters():
            if "peephole" in name:
                p.normal_(0, 0.5)
    return model.eval()


def _stepwise(model, ids):
    """The model run one character at a time through its own layers (fused kernels for
    lstm/gru/rnn): per layer, the state after each character and each layer's input."""
    state = model.init_state(1)
    states, inputs = [], []
    with torch.no_grad():
        for i in ids:
            x = model.embedding(torch.tensor([[i]]))  # (1, 1, E)
            layer_inputs, new = [], []
            for layer, rnn in enumerate(model.layers):
                mine = tuple(s[layer : layer + 1] for s in state)
                layer_inputs.append(x[0, 0])
                x, out = rnn(x, mine if model.config.cell in LSTM_CELLS else mine[0])
                new.append(out if isinstance(out, tuple) else (out,))
            state = tuple(torch.cat(parts) for parts in zip(*new))
            states.append(tuple(s[:, 0] for s in state))  # (L, H) each
            inputs.append(layer_inputs)
    return states, inputs


def _gates_by_formula(rnn, cell, x, h, c):
    """The cell equations written out again (see charrnn.model.cells and torch.nn docs)."""
    if cell == "rnn":
        return {}  # no gates
    if cell == "gru":
        gi, gh = F.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0), F.linear(h, rnn.weight_hh_l0, rnn.bias_hh_l0)
        H = h.shape[0]
        return {"reset": torch.sigmoid(gi[:H] + gh[:H]), "update": torch.sigmoid(gi[H : 2 * H] + gh[H : 2 * H])}
    wx, wh = F.linear(x, rnn.weight_ih_l0), F.linear(h, rnn.weight_hh_l0)
    if cell == "layernorm":
        wx, wh = rnn.norm_x(wx), rnn.norm_h(wh)
    i, f, g, o = (wx + wh + rnn.bias_ih_l0 + rnn.bias_hh_l0).chunk(4)
    if cell == "peephole":
        i, f = i + rnn.peephole_i * c, f + rnn.peephole_f * c
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        o = o + rnn.peephole_o * c_new
    return {"input": torch.sigmoid(i), "forget": torch.sigmoid(f), "output": torch.sigmoid(o)}


@pytest.mark.parametrize("cell", CELLS)
def test_loss_top5_activations_and_gates_equal_independent_recomputation(cell):
    model = _model(cell)
    ids = torch.randint(0, 40, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    found = analysis.trace(model, ids)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))  # the whole text at once
    log_probs = F.log_softmax(logits[0], dim=-1)
    expected = -log_probs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(found.loss[1:], expected, atol=1e-5, rtol=1e-5)
    assert torch.isnan(found.loss[0])
    probs, top = log_probs[:-1].exp().topk(5, dim=-1)
    assert torch.equal(found.top_ids[1:], top)
    torch.testing.assert_close(found.top_probs[1:], probs, atol=1e-6, rtol=1e-5)

    states, inputs = _stepwise(model, ids)
    for layer, rnn in enumerate(model.layers):
        if cell in LSTM_CELLS:
            activation = torch.stack([torch.tanh(s[1][layer]) for s in states])
        else:
            activation = torch.stack([s[0][layer] for s in states])
        torch.testing.assert_close(found.activations[layer], activation, atol=1e-5, rtol=1e-5)
        start = model.init_state(1)
        for t in range(len(ids)):
            h = states[t - 1][0][layer] if t else start[0][layer, 0]
            c = (states[t - 1][1][layer] if t else start[1][layer, 0]) if cell in LSTM_CELLS else None
            with torch.no_grad():
                gates = _gates_by_formula(rnn, cell, inputs[t][layer], h, c)
            assert set(gates) == set(found.gates[layer])
            for name, value in gates.items():
                torch.testing.assert_close(found.gates[layer][name][t], value, atol=1e-5, rtol=1e-5)
    assert found.gates[0] == {} if cell == "rnn" else len(found.gates[0]) in (2, 3)


def test_feature_scores_find_a_planted_unit_and_not_a_random_one():
    pieces = ['say "hello there"', "and", "(go (home))", "now\n", '"yes"', "no", "then (we) went\n", "ok"]
    order = torch.randint(0, len(pieces), (400,), generator=torch.Generator().manual_seed(3)).tolist()
    text = " ".join(pieces[k] for k in order)[:1500]  # not periodic: a shifted copy does not line up again
    features = analysis.text_features(text)
    generator = torch.Generator().manual_seed(0)
    layer0 = torch.rand(len(text), 8, generator=generator) * 2 - 1
    layer1 = torch.rand(len(text), 8, generator=generator) * 2 - 1
    layer1[:, 5] = features["inside double quotes"] * 1.6 - 0.8 + 0.05 * layer1[:, 5]  # the planted quote unit
    layer0[:, 2] = -features["position in the line"] / 40  # a line counter, inverted: |r| counts
    findings = {f.feature: f for f in analysis.feature_scores([layer0, layer1], text)}
    quotes = findings["inside double quotes"]
    assert (quotes.layer, quotes.unit) == (1, 5) and quotes.score > 0.99 and quotes.control < 0.3
    line = findings["position in the line"]
    assert (line.layer, line.unit) == (0, 2) and line.score > 0.99 and line.control < 0.3
    random_unit = analysis.scores(layer0[:, :1].double(), features["inside double quotes"].double(), True)
    assert float(random_unit[0]) < 0.1
    assert analysis.auroc_of(quotes.score) > 0.99


def test_auroc_matches_its_definition():
    units = torch.tensor([[0.1], [0.4], [0.35], [0.8]], dtype=torch.double)
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.double)
    # pairs (positive, negative) where the positive is higher: (0.35 > 0.1), (0.8 > both) = 3 of 4
    assert analysis.auroc_of(float(analysis.scores(units, labels, True)[0])) == pytest.approx(0.75)


def test_saturation_and_loss_by_class():
    gate = torch.tensor([[0.05, 0.5], [0.95, 0.5], [0.02, 0.91], [0.5, 0.5]])
    parts = analysis.saturation([{"forget": gate}])[0]["forget"]
    assert parts["left"].tolist() == [0.5, 0.0] and parts["right"].tolist() == [0.25, 0.25]
    loss = torch.tensor([float("nan"), 1.0, 2.0, 3.0, 4.0])
    classes = analysis.loss_by_class("ab c\n", loss)
    ln2 = torch.log(torch.tensor(2.0)).item()
    assert classes["inside a word"] == {"bits": pytest.approx(1 / ln2), "count": 1}
    assert classes["spaces"]["count"] == 1 and classes["newlines"]["bits"] == pytest.approx(4 / ln2)
    assert classes["start of a word"]["bits"] == pytest.approx(3 / ln2)


def test_viz_surprisal_equals_eval_on_every_character_the_first_10_too(trained_run):
    """The page's per-character loss is eval's: with the start mix read into the first
    predictions as eval reads them (the API's network, vocabulary and prior)."""
    import charrnn
    from charrnn.infer.evaluate import evaluate
    from charrnn.model.startmix import POSITIONS

    model = charrnn.load(trained_run, device="cpu")
    assert model.prior is not None and bool((model.prior.weights > 0).any())
    ids, _ = model.vocab.encode(VERSE[:40])
    found = analysis.trace(model.network, ids.tolist(), model.prior)
    alone = analysis.trace(model.network, ids.tolist())
    for k in range(1, len(ids)):  # a text of k + 1 characters: k predictions, one stream from the start state
        scored = evaluate(model.network, ids[: k + 1], model.device, prior=model.prior)
        assert found.loss[1 : k + 1].sum().item() == pytest.approx(scored.loss * k, abs=2e-4)
    mixed = [k for k in range(1, POSITIONS + 1) if model.prior.mixes(k)]
    assert mixed and all(abs(found.loss[k] - alone.loss[k]) > 1e-6 for k in mixed)  # the prior changed them
    assert torch.equal(found.loss[POSITIONS + 1 :], alone.loss[POSITIONS + 1 :])

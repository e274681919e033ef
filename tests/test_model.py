import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from charrnn.config import ModelConfig
from charrnn.data import Vocab
from charrnn.evaluate import evaluate, stream_count
from charrnn.model import CharRNN
from charrnn.sample import SampleSettings, generate, next_ids

from conftest import VERSE


CELLS = ["lstm", "gru", "rnn", "peephole", "layernorm"]


def make_model(cell="lstm", vocab_size=20, seed=0):
    torch.manual_seed(seed)
    return CharRNN(ModelConfig(cell=cell, hidden_size=24, num_layers=2, embedding_size=8, dropout=0.0), vocab_size).eval()


def shaken(model: CharRNN) -> CharRNN:
    """Noise on every parameter, so that peepholes (0 at init) and layer-norm gains and
    shifts (1 and 0) take part in what a test compares."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


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


def test_greedy_is_argmax():
    logits = torch.randn(5, 30)
    assert torch.equal(next_ids(logits, SampleSettings(temperature=0), None), logits.argmax(-1))


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    top2 = next_ids(logits, SampleSettings(temperature=1.0, top_k=2), gen)
    assert set(top2.tolist()) == {0, 1}
    # p(0) ~ 0.72, p(1) ~ 0.27: top_p 0.5 keeps only the first.
    assert set(next_ids(logits, SampleSettings(temperature=1.0, top_p=0.5), gen).tolist()) == {0}
    assert set(next_ids(logits, SampleSettings(temperature=1.0, top_p=0.9), gen).tolist()) == {0, 1}


def _sample(model, vocab, seed, **kw):
    gen = torch.Generator().manual_seed(seed)
    settings = SampleSettings(**{"length": 60, "temperature": 1.0, **kw})
    prime, _ = vocab.encode("The ")
    return ["".join(c) for c in zip(*generate(model, vocab, prime, settings, num_samples=2, generator=gen))]


def test_seeded_sampling_is_reproducible():
    vocab = Vocab.from_text(VERSE)
    model = make_model(vocab_size=len(vocab))
    assert _sample(model, vocab, 7) == _sample(model, vocab, 7)
    assert _sample(model, vocab, 7) != _sample(model, vocab, 8)


def test_sampling_follows_model_distribution_step_by_step():
    """The generated ids equal a hand-run loop over model.forward with the same generator."""
    vocab = Vocab.from_text(VERSE)
    model = make_model(vocab_size=len(vocab))
    text = _sample(model, vocab, 3, length=30)[0]
    gen = torch.Generator().manual_seed(3)
    prime, _ = vocab.encode("The ")
    logits, state = model(prime.long()[None].expand(2, -1))
    out = []
    for _ in range(30):
        cdf = torch.softmax(logits[:, -1].float(), dim=-1).cumsum(-1)
        ids = (cdf < torch.rand((2, 1), generator=gen) * cdf[:, -1:]).sum(-1)  # inverse-CDF draw
        out.append(vocab.chars[ids[0]])
        logits, state = model(ids[:, None], state)
    assert text == "".join(out)


def test_stop_string_ends_a_sample():
    vocab = Vocab.from_text(VERSE)
    model = make_model(vocab_size=len(vocab))
    full = _sample(model, vocab, 1, length=200, temperature=0.0)[0]
    stop = full[10:12]
    first = full.index(stop)
    stopped = _sample(model, vocab, 1, length=200, temperature=0.0, stop=stop)[0]
    assert stopped == full[: first + len(stop)]


def test_evaluate_equals_one_pass_cross_entropy():
    model = make_model(vocab_size=20)
    ids = torch.randint(0, 20, (300,))
    logits, _ = model(ids[None, :-1])
    expected = F.cross_entropy(logits[0], ids[1:]).item()
    result = evaluate(model, ids, torch.device("cpu"))
    assert result.chars == 299
    assert math.isclose(result.loss, expected, rel_tol=1e-5)
    assert math.isclose(result.bpc, expected / math.log(2), rel_tol=1e-5)
    assert math.isclose(result.perplexity, math.exp(expected), rel_tol=1e-5)


def test_evaluate_streams_and_tail_score_every_character_once():
    """Several streams plus a tail: equals a manual computation with the same layout."""
    model = make_model(vocab_size=20)
    ids = torch.randint(0, 20, (2 * 1024 + 38,))  # 2085 predictions: 2 streams of 1042 + a tail of 1
    count = len(ids) - 1
    stream_len = count // 2
    total = 0.0
    for s in range(2):
        x = ids[s * stream_len : (s + 1) * stream_len]
        y = ids[s * stream_len + 1 : (s + 1) * stream_len + 1]
        logits, state = model(x[None])
        total += F.cross_entropy(logits[0], y, reduction="sum").item()
    logits, _ = model(ids[2 * stream_len : count][None], state)  # tail continues stream 1
    total += F.cross_entropy(logits[0], ids[2 * stream_len + 1 :], reduction="sum").item()
    result = evaluate(model, ids, torch.device("cpu"))
    assert result.chars == count
    assert math.isclose(result.loss, total / count, rel_tol=1e-5)


def test_evaluate_in_one_stream_reads_the_text_as_one_sequence():
    """max_streams=1 (eval --streams 1) is one forward pass over the whole text."""
    model = make_model(vocab_size=20)
    ids = torch.randint(0, 20, (5_000,))
    logits, _ = model(ids[:-1][None])
    whole = F.cross_entropy(logits[0], ids[1:]).item()
    one = evaluate(model, ids, torch.device("cpu"), max_streams=1)
    assert one.chars == len(ids) - 1 and math.isclose(one.loss, whole, rel_tol=1e-5)
    assert stream_count(len(ids) - 1) == 4  # where the default cuts it in four


@pytest.mark.parametrize("settings", [
    dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.2, top_p=0.9), dict(temperature=0.0),
])
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_fast_decoder_samples_the_same_text_as_the_reference_path(settings, layers, cell):
    vocab = Vocab.from_text(VERSE)
    torch.manual_seed(5)
    config = ModelConfig(cell=cell, hidden_size=32, num_layers=layers, embedding_size=8, dropout=0.0)
    model = shaken(CharRNN(config, len(vocab)).eval())
    prime, _ = vocab.encode("Voilà ")

    def run(fast):
        gen = torch.Generator().manual_seed(11)
        steps = generate(model, vocab, prime, SampleSettings(length=300, **settings), num_samples=3,
                         generator=gen, fast=fast)
        return ["".join(c) for c in zip(*steps)]

    assert run(fast=True) == run(fast=False)


@pytest.mark.parametrize("cell", CELLS)
def test_fast_decoder_logits_match_forward(cell):
    from charrnn.decode import make_decoder

    model = shaken(make_model(cell, vocab_size=20))
    ids = torch.randint(0, 20, (4, 12))
    expected, _ = model(ids)
    _, state = model(ids[:, :1])
    decoder = make_decoder(model, 4)
    decoder.load_state(state)
    for t in range(1, 12):
        logits = decoder.step(ids[:, t])
        torch.testing.assert_close(logits, expected[:, t], rtol=1e-5, atol=1e-5)


def test_dropout_keeps_the_expected_fraction_and_scales():
    from charrnn.model import dropout

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


@pytest.mark.parametrize("cell", CELLS)
def test_bf16_decoder_for_many_streams_stays_close_to_fp32(cell):
    from charrnn.decode import make_decoder, matmul_dtype

    assert matmul_dtype(torch.bfloat16, 1, torch.device("cpu")) == torch.float32  # GEMV: fp32 is faster
    assert matmul_dtype(torch.bfloat16, 64, torch.device("cpu")) == torch.bfloat16
    model = make_model(cell, vocab_size=20)
    ids = torch.randint(0, 20, (16, 10))
    expected, _ = model(ids)
    _, state = model(ids[:, :1])
    decoder = make_decoder(model, 16, dtype=torch.bfloat16)
    assert decoder.w_head.dtype == torch.bfloat16
    decoder.load_state(state)
    for t in range(1, 10):
        torch.testing.assert_close(decoder.step(ids[:, t]), expected[:, t], rtol=0, atol=0.05)


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.clamp_min(1e-30).log().expand(20000, -1)
    ids = next_ids(logits, SampleSettings(temperature=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / 20000
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.015)


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

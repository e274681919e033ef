"""The start mix: a prior (a k-gram model) mixed into the first predictions of a read
from the start state, by the scorer and the decoder that take it."""

import math
from collections import Counter

import pytest
import torch
from conftest import VERSE, corpus_of, run_cli, tiny_configs

from charrnn.config import ModelConfig
from charrnn.data.text import Vocab, split
from charrnn.errors import CheckpointError
from charrnn.infer.evaluate import cold_start, evaluate, read
from charrnn.infer.sample import SampleSettings, generate
from charrnn.model.network import CharRNN
from charrnn.model.startmix import POSITIONS, StartMix, max_order
from charrnn.store import checkpoint

TEXT = ("ROMEO:\nBut soft, what light through yonder window breaks?\n\n"
        "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n\n") * 30


def _ids(text: str = TEXT) -> tuple[torch.Tensor, int]:
    vocab = sorted(set(text))
    return torch.tensor([vocab.index(c) for c in text]), len(vocab)


def _witten_bell(ids: list[int], vocab_size: int, order: int):
    """The k-gram model counted with dicts, as scripts/coldstart.py does: the reference."""
    grams = [Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)) for n in range(order + 1)]
    totals, kinds = [Counter() for _ in range(order)], [Counter() for _ in range(order)]
    for n in range(1, order):
        for gram, count in grams[n + 1].items():
            totals[n][gram[:-1]] += count
            kinds[n][gram[:-1]] += 1

    def probability(history: list[int], char: int) -> float:
        p = (grams[1][(char,)] + 1) / (len(ids) + vocab_size)
        for n in range(1, min(len(history), order - 1) + 1):
            h = tuple(history[-n:])
            if totals[n][h]:
                p = (grams[n + 1][h + (char,)] + kinds[n][h] * p) / (totals[n][h] + kinds[n][h])
        return p

    return probability


def test_kgram_probabilities_equal_witten_bell_counted_by_hand():
    ids, v = _ids()
    mix = StartMix.build(ids, v)
    assert mix.order == 6
    reference = _witten_bell(ids.tolist(), v, mix.order)
    generator = torch.Generator().manual_seed(0)
    for m in (1, 2, 4, 5, 9):
        starts = torch.randint(0, len(ids) - m, (12,), generator=generator)
        history = torch.stack([ids[s : s + m] for s in starts])
        history[0] = torch.randint(0, v, (m,), generator=generator)  # most likely an unseen context
        log_p = mix.log_probs(history)
        by_hand = torch.tensor([[math.log(reference(h, c)) for c in range(v)] for h in history.tolist()])
        assert torch.allclose(log_p, by_hand.float(), atol=1e-5)
        assert torch.allclose(log_p.exp().sum(-1), torch.ones(12), atol=1e-5)


def test_a_big_table_keeps_fewer_orders_and_keys_fit_int64():
    ids, v = _ids()
    full = StartMix.build(ids, v)
    grams = [len(k) for k in full.keys]
    small = StartMix.build(ids, v, max_grams=sum(grams[:3]))
    assert small.order == 3 and [len(k) for k in small.keys] == grams[:3]
    assert max_order(65) == 10 and max_order(5000) == 5 and 5000 ** max_order(5000) < 2**63


def _model_with_mix(weight: float) -> tuple[CharRNN, StartMix, torch.Tensor]:
    ids, v = _ids()
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(hidden_size=24, num_layers=2, embedding_size=8, dropout=0.0), v).eval()
    prior = StartMix.build(ids, v)
    prior.weights = torch.full((POSITIONS,), weight)
    return model, prior, ids


def test_a_read_from_the_start_state_mixes_its_first_predictions_only():
    model, mix, ids = _model_with_mix(0.3)
    x = ids[:40].view(2, 20)
    mixed, state = read(model, x, None, mix)
    alone, alone_state = model(x)
    for t in range(POSITIONS):
        expected = torch.logaddexp(alone[:, t].log_softmax(-1) + math.log(0.7),
                                   mix.log_probs(x[:, : t + 1]) + math.log(0.3))
        assert torch.allclose(mixed[:, t], expected, atol=1e-5)
    assert torch.equal(mixed[:, POSITIONS:], alone[:, POSITIONS:])
    assert all(torch.equal(a, b) for a, b in zip(state, alone_state))
    # Carried state is the network alone, and so is a read given no prior.
    assert torch.equal(read(model, x, model.init_state(2), mix)[0], alone)
    assert torch.equal(read(model, x, None, None)[0], alone)
    mix.weights = torch.zeros(POSITIONS)
    assert torch.equal(read(model, x, None, mix)[0], alone)


def test_fit_chooses_weights_that_lower_the_loss_where_the_network_knows_little():
    model, prior, ids = _model_with_mix(0.0)  # an untrained network: the k-gram knows far more
    prior.fit(model, ids, seed=1)
    assert bool(((prior.weights > 0.5) & (prior.weights <= 1)).all())
    assert not model.training  # fit leaves the model in the mode it found it
    generator = torch.Generator().manual_seed(0)
    cold_mixed, _ = cold_start(model, ids, windows=64, context=20, positions=POSITIONS, generator=generator, prior=prior)
    generator = torch.Generator().manual_seed(0)
    cold_alone, _ = cold_start(model, ids, windows=64, context=20, positions=POSITIONS, generator=generator)
    assert sum(cold_mixed) < sum(cold_alone) - 5


def test_the_stored_form_is_compact_and_reads_back_the_same_tables():
    ids, v = _ids()
    mix = StartMix.build(ids, v)
    mix.weights = torch.linspace(0, 0.9, POSITIONS)
    stored = mix.state()
    assert StartMix.problem(stored, v) is None
    again = StartMix.from_state(stored, v)
    assert all(torch.equal(a, b) for a, b in zip(again.keys, mix.keys))
    assert all(torch.equal(a, b) for a, b in zip(again.counts, mix.counts))
    assert torch.equal(again.weights, mix.weights)
    history = ids[:50].view(10, 5)
    assert torch.equal(again.log_probs(history), mix.log_probs(history))
    stored_bytes = sum(t.numel() * t.element_size() for part in ("chars", "counts", "children") for t in stored[part])
    memory_bytes = sum(k.numel() * 8 + c.numel() * 4 for k, c in zip(mix.keys, mix.counts))
    assert stored_bytes * 3 < memory_bytes  # ~3 bytes an n-gram against 12
    assert all(t.dtype == torch.uint8 for t in stored["chars"])
    # The first stored form (int64 keys) still loads.
    first = {"keys": list(mix.keys), "counts": list(mix.counts), "weights": mix.weights}
    assert StartMix.problem(first, v) is None
    assert all(torch.equal(a, b) for a, b in zip(StartMix.from_state(first, v).keys, mix.keys))


@pytest.mark.parametrize("fast", [True, False])
def test_sampling_mixes_the_characters_it_writes_in_the_first_positions(fast):
    text = "abc" * 200
    vocab = Vocab("abc")
    ids = torch.tensor([vocab.chars.index(c) for c in text])
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(hidden_size=16, num_layers=1, embedding_size=4, dropout=0.0), 3).eval()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 9.0]))  # the network alone says "c" always
    prior = StartMix.build(ids, 3)
    prior.weights = torch.ones(POSITIONS)  # the k-gram alone in the first positions
    settings = SampleSettings(length=20, temperature=0)
    written = "".join(c[0] for c in generate(model, vocab, torch.tensor([0, 1]), settings, fast=fast, prior=prior))
    # Read after "ab": predictions 2..10 are the k-gram's (the text's own order), then "c".
    assert written == "cabcabcab" + "c" * 11


def test_training_stores_the_mix_and_eval_reads_with_it(trained_run, tmp_path):
    payload = checkpoint.load(trained_run / "best.pt")
    assert payload.start_mix is not None and payload.start_mix["weights"].shape == (POSITIONS,)
    model, vocab = checkpoint.restore_model(payload)
    prior = checkpoint.restore_prior(payload)
    assert torch.equal(prior.weights, payload.start_mix["weights"])
    ids, _ = vocab.encode(VERSE * 20, "skip")
    _, val = split(ids, 0.1)
    with_mix = evaluate(model, val, torch.device("cpu"), prior=prior).loss
    assert with_mix == pytest.approx(payload.progress["best_val_loss"], abs=1e-6)
    if bool((payload.start_mix["weights"] > 0).any()):
        assert evaluate(model, val, torch.device("cpu")).loss != with_mix


def test_eval_json_says_whether_the_start_mix_read(trained_run, tmp_path):
    import json

    text = tmp_path / "t.txt"
    text.write_text(VERSE, encoding="utf-8")
    done = run_cli("eval", text, "-m", trained_run, "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["start_mix"] is True
    payload = torch.load(trained_run / "best.pt", weights_only=True)
    del payload["start_mix"]
    torch.save(payload, tmp_path / "alone.pt")
    done = run_cli("eval", text, "-m", tmp_path / "alone.pt", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["start_mix"] is False


def test_no_start_mix_trains_the_network_alone(tmp_path):
    from charrnn.training.run import trainer_for

    model_config, train_config = tiny_configs(train={"start_mix": False})
    run = tmp_path / "run"
    trainer_for(corpus_of(VERSE * 20), model_config, train_config, run).run()
    payload = checkpoint.load(run / "best.pt")
    assert payload.start_mix is None and checkpoint.restore_prior(payload) is None


@pytest.mark.parametrize("damage", ["not a dict", "unfitting", "weights"])
def test_a_damaged_start_mix_is_a_clear_error(trained_run, tmp_path, damage):
    payload = torch.load(trained_run / "best.pt", weights_only=True)
    mix = payload["start_mix"]
    if damage == "not a dict":
        payload["start_mix"] = [1, 2]
    elif damage == "unfitting":
        mix["children"][0] = mix["children"][0][:-1]
    else:
        mix["weights"] = torch.full((POSITIONS,), 2.0)
    path = tmp_path / "damaged.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="start_mix"):
        checkpoint.load(path)
    done = run_cli("sample", "-m", path, "-n", "5")
    assert done.returncode == 1 and "start_mix" in done.stderr and "Traceback" not in done.stderr

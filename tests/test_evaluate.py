"""Scoring: loss over streams and a tail, dynamic evaluation, the cold-start measurement."""

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VERSE, make_model, run_cli

from charrnn.config import DynamicSettings, ModelConfig
from charrnn.infer.evaluate import cold_start, dynamic_evaluate, evaluate, stream_count
from charrnn.model.network import CharRNN

CPU = torch.device("cpu")


def _model(seed=0):
    torch.manual_seed(seed)
    return CharRNN(ModelConfig(hidden_size=24, num_layers=2, embedding_size=8, dropout=0.0), 20).eval()


def test_dynamic_evaluation_with_step_size_zero_is_static_evaluation_exactly():
    model = _model()
    ids = torch.randint(0, 20, (9_100,))  # 8 streams of 1,137 and a tail of 4
    settings = DynamicSettings(step_size=0.0, segment=50, streams=8)
    static = evaluate(model, ids, CPU, max_streams=8, chunk=50)
    assert dynamic_evaluate(model, ids, CPU, settings).loss == static.loss
    assert dynamic_evaluate(model, ids, CPU, settings).chars == static.chars == len(ids) - 1


def test_dynamic_evaluation_adapts_to_the_text_and_leaves_the_weights_as_they_were():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # A text the random model knows nothing of, but which repeats: adapting must pay.
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6] * 1200)
    static = evaluate(model, ids, CPU, max_streams=8, chunk=50).loss
    adapted = dynamic_evaluate(model, ids, CPU, DynamicSettings(step_size=3e-3)).loss
    assert adapted < static - 0.5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_dynamic_evaluation_is_repeatable():
    model = _model()
    ids = torch.randint(0, 20, (5_000,))
    settings = DynamicSettings(step_size=1e-3)
    assert dynamic_evaluate(model, ids, CPU, settings).loss == dynamic_evaluate(model, ids, CPU, settings).loss


def test_eval_dynamic_reports_both_and_leaves_the_checkpoint_file_unchanged(trained_run, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(VERSE * 4, encoding="utf-8")
    best = trained_run / "best.pt"
    digest = hashlib.sha256(best.read_bytes()).hexdigest()
    runs = [run_cli("eval", text, "-m", trained_run, "--dynamic", "--json") for _ in range(2)]
    for done in runs:
        assert done.returncode == 0, done.stderr
    first, second = (json.loads(done.stdout) for done in runs)
    assert first["dynamic"]["loss"] == second["dynamic"]["loss"]
    assert first["dynamic"]["loss"] < first["loss"]  # the verse repeats: reading it teaches it
    assert first["dynamic"]["chars"] == first["chars"] and first["dynamic"]["chars_per_s"] > 0
    assert hashlib.sha256(best.read_bytes()).hexdigest() == digest
    plain = run_cli("eval", text, "-m", trained_run, "--dynamic")
    lines = plain.stdout.splitlines()
    assert lines[0].startswith("chars ") and lines[1].startswith("dynamic  loss ")


@pytest.mark.parametrize("flag,value", [("--step-size", "-1"), ("--decay", "2"), ("--segment", "0")])
def test_eval_dynamic_rejects_bad_settings(trained_run, tmp_path, flag, value):
    text = tmp_path / "t.txt"
    text.write_text(VERSE, encoding="utf-8")
    done = run_cli("eval", text, "-m", trained_run, "--dynamic", flag, value)
    assert done.returncode == 2 and flag in done.stderr and "Traceback" not in done.stderr


def test_cold_start_reads_windows_from_the_start_state_and_with_context():
    model = _model()
    ids = torch.randint(0, 20, (2_000,))
    generator = torch.Generator().manual_seed(0)
    cold, warm = cold_start(model, ids, windows=16, context=30, positions=5, generator=generator)
    assert len(cold) == len(warm) == 5
    # Recompute the first window's cold losses by hand.
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(30, len(ids) - 6, (16, 1), generator=generator)
    span = ids[starts + torch.arange(0, 6)]
    logits, _ = model(span[:, :5])
    by_hand = torch.nn.functional.cross_entropy(logits.transpose(1, 2), span[:, 1:], reduction="none").mean(0)
    assert torch.allclose(torch.tensor(cold), by_hand, atol=1e-6)


def _play(lines: int = 400) -> str:
    """A play-like text: a speaker's name, a line of words, a blank line."""
    generator = torch.Generator().manual_seed(0)
    speakers = ["ROMEO", "JULIET", "NURSE", "MERCUTIO"]
    words = "the and of my thy love night day sweet fair good".split()
    parts = []
    for _ in range(lines):
        speaker = speakers[int(torch.randint(0, 4, (1,), generator=generator))]
        body = " ".join(words[int(i)] for i in torch.randint(0, len(words), (8,), generator=generator))
        parts.append(f"{speaker}:\n{body}.\n\n")
    return "".join(parts)


def test_training_from_the_start_state_closes_most_of_the_cold_start_gap(tmp_path):
    """The first characters read from the start state (a prime, an eval) lose much less
    to the same characters read in context once training starts sequences from it."""
    from conftest import corpus_of, tiny_configs

    from charrnn.training.run import trainer_for

    gaps, mixed = {}, None
    for stateless in (False, True):
        model_config, train_config = tiny_configs(train={"steps": 150, "eval_every": 150, "seq_len": 32,
                                                         "batch_size": 8, "stateless": stateless})
        trainer = trainer_for(corpus_of(_play()), model_config, train_config, tmp_path / str(stateless))
        trainer.run()
        model, prior = trainer.state.model, trainer.state.prior
        assert prior is not None
        mixed = _mean_gap(model, trainer.plan.val_ids, prior)  # as sample and eval read: with the start mix (on by default)
        gaps[stateless] = _mean_gap(model, trainer.plan.val_ids)  # the network alone
    assert gaps[True] < 0.5 * gaps[False]
    # The start mix narrows the stateless model's gap further.
    assert mixed < gaps[True] - 0.05


def _mean_gap(model, ids, prior=None) -> float:
    cold, warm = cold_start(model, ids, windows=128, context=60, positions=10, generator=torch.Generator().manual_seed(0),
                            prior=prior)
    return (sum(cold) - sum(warm)) / len(cold)


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

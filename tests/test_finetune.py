"""--init-from: fine-tuning a trained model on a new text, new characters included."""

import hashlib

import torch
from conftest import VERSE, corpus_of, tiny_configs
from typer.testing import CliRunner

import charrnn
from charrnn.cli import app
from charrnn.config import TrainConfig
from charrnn.infer.evaluate import evaluate
from charrnn.store import checkpoint
from charrnn.training.run import trainer_for

SPANISH = "El niño soñó con la montaña; ¿qué año es? ¡Mañana será otoño!\n" * 40


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_new_characters_extend_the_vocabulary_train_and_sample(trained_run, tmp_path):
    base = trained_run / "best.pt"
    before = _digest(base)
    corpus = tmp_path / "es.txt"
    corpus.write_text(SPANISH)
    result = invoke("train", corpus, "--init-from", trained_run, "--out", tmp_path / "es", "--steps", 60,
                    "--eval-every", 30, "--batch-size", 8, "--seq-len", 32, "--learning-rate", 1e-2, "--device", "cpu",
                    "--dtype", "fp32")
    assert result.exit_code == 0, result.stderr
    base_chars = checkpoint.load(base).vocab
    added = "".join(sorted(set(SPANISH) - set(base_chars)))
    assert "ñ" in added and "¿" in added
    assert f"vocabulary extended by {len(added)} character(s): {added!r}" in result.stderr
    payload = checkpoint.load(tmp_path / "es" / "best.pt")
    assert payload.vocab == "".join(sorted(set(base_chars) | set(added)))
    assert payload.parent == {"path": str(base), "added_chars": added}
    # The decay is not chosen from the passes here: 0.2 would pull the parent's weights to zero.
    assert payload.train_config["weight_decay"] == TrainConfig().weight_decay == 0.01
    assert "weight decay" not in result.stderr
    # The base model's rows are kept where its characters moved to in the larger vocabulary.
    base_weights = checkpoint.load(base).model["layers.1.weight_hh_l0"]
    assert not torch.equal(payload.model["layers.1.weight_hh_l0"], base_weights)  # it trained
    text = charrnn.load(tmp_path / "es").sample(prime="El ni", length=400, seed=3, temperature=0.8)
    assert "ñ" in text[5:]  # a character the base model never saw, now written
    assert _digest(base) == before


def test_with_no_new_characters_step_0_scores_as_the_base_model(trained_run):
    payload = checkpoint.load(trained_run / "best.pt")
    base, _ = checkpoint.restore_model(payload)
    model_config = base.config
    _, train_config = tiny_configs(train={"steps": 5})
    trainer = trainer_for(corpus_of(VERSE * 10), model_config, train_config, trained_run.parent / "ft", base=payload)
    assert trainer.plan.vocab.chars == payload.vocab
    # The start mix is counted on the new text (and fit at its first validation), so the
    # networks alone are compared: the weights carried over.
    assert trainer.state.prior is not None and payload.start_mix is not None
    assert sum(trainer.state.prior.counts[0]) == len(trainer.plan.train_ids)
    ours = evaluate(trainer.state.model, trainer.plan.val_ids, torch.device("cpu"))
    theirs = evaluate(base, trainer.plan.val_ids, torch.device("cpu"))
    assert ours.loss == theirs.loss


def test_a_model_flag_that_differs_is_named_and_resume_with_init_from_is_refused(trained_run, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(VERSE * 10)
    result = invoke("train", corpus, "--init-from", trained_run, "--hidden-size", 999, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "hidden_size" in result.stderr and "--init-from" in result.stderr
    result = invoke("train", corpus, "--init-from", trained_run, "--resume", trained_run)
    assert result.exit_code == 2 and "give one of them" in result.stderr
    assert not (tmp_path / "x").exists()


def test_extending_the_vocabulary_is_pure_and_keeps_every_base_row():
    from charrnn.config import ModelConfig
    from charrnn.data.text import Vocab
    from charrnn.model.network import CharRNN
    from charrnn.training.finetune import extended_vocab, extended_weights

    base_vocab = Vocab("abc")
    vocab, added = extended_vocab(base_vocab, Vocab("abdz"))
    assert vocab.chars == "abcdz" and added == "dz"
    config = ModelConfig(hidden_size=8, embedding_size=4, num_layers=1)
    torch.manual_seed(0)
    base = CharRNN(config, 3).state_dict()
    fresh = CharRNN(config, 5).state_dict()
    before = {k: v.clone() for k, v in base.items()}
    weights = extended_weights(base, base_vocab, vocab, fresh)
    assert all(torch.equal(before[k], base[k]) for k in base)  # the inputs are not changed
    kept = [0, 1, 2]  # a, b, c keep their places in "abcdz"
    assert torch.equal(weights["embedding.weight"][kept], base["embedding.weight"])
    assert torch.equal(weights["embedding.weight"][3:], fresh["embedding.weight"][3:])
    assert torch.equal(weights["head.weight"][3:], torch.zeros(2, 8))
    assert torch.equal(weights["head.bias"][3:], torch.full((2,), float(base["head.bias"].min())))
    assert torch.equal(weights["layers.0.weight_hh_l0"], base["layers.0.weight_hh_l0"])

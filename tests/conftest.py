import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from charrnn.config import ModelConfig, TrainConfig
from charrnn.data.text import Corpus
from charrnn.model.network import CharRNN
from charrnn.training.run import trainer_for

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# A small corpus with accents, CJK, an emoji, tabs and a form feed.
VERSE = (
    "The quick brown fox jumps over the lazy dog.\n"
    "Voilà l'été: café, naïve, façade.\tTabs\tand\f form feeds.\n"
    "春眠不覚暁, 処処聞啼鳥 🙂\n"
)

TINY_MODEL = dict(hidden_size=32, num_layers=2, embedding_size=16, dropout=0.0)
TINY_TRAIN = dict(batch_size=4, seq_len=16, steps=30, eval_every=10, sample_length=20, warmup_steps=5,
                  dtype="fp32", device="cpu", learning_rate=1e-2)


def tiny_configs(model=None, train=None):
    return ModelConfig(**{**TINY_MODEL, **(model or {})}), TrainConfig(**{**TINY_TRAIN, **(train or {})})


def corpus_of(text: str, name: str = "tiny") -> Corpus:
    return Corpus(name, [name], text.encode("utf-8"))


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    # Prepared corpora go to a cache of the session's own, never the user's ~/.cache;
    # subprocesses inherit it.
    previous = os.environ.get("CHARRNN_CACHE")
    os.environ["CHARRNN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("CHARRNN_CACHE", None)
    else:
        os.environ["CHARRNN_CACHE"] = previous


@pytest.fixture(autouse=True)
def _cpu_threads():
    # Tests use tiny models where one thread is fastest and keeps runs deterministic.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny model trained for 30 steps on VERSE * 20; its run directory."""
    run_dir = tmp_path_factory.mktemp("run") / "runs" / "tiny"
    model_config, train_config = tiny_configs()
    trainer_for(corpus_of(VERSE * 20), model_config, train_config, run_dir).run()
    return run_dir


def run_cli(*args, cwd=None, input=None, timeout=120, env=None):
    """Run `python -m charrnn ARGS` in a subprocess (for exit codes, pipes and signals)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "charrnn", *map(str, args)], cwd=cwd, input=input,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


CELLS = ["lstm", "gru", "rnn", "peephole", "layernorm"]


def make_model(cell="lstm", vocab_size=20, seed=0, hidden_size=24):
    torch.manual_seed(seed)
    return CharRNN(ModelConfig(cell=cell, hidden_size=hidden_size, num_layers=2, embedding_size=8, dropout=0.0), vocab_size).eval()


def shaken(model: CharRNN) -> CharRNN:
    """Noise on every parameter, so that peepholes (0 at init) and layer-norm gains and
    shifts (1 and 0) take part in what a test compares."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model

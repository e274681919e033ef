"""charrnn: character-level language models (LSTM, GRU, RNN) you train, sample and evaluate.

    import charrnn
    model = charrnn.load("runs/tinyshakespeare")     # a run directory or a .pt
    print(model.sample(prime="ROMEO:", length=300, temperature=0.7, seed=1))
    print(model.score(open("held_out.txt").read()).bpc)
    summary = charrnn.train("corpus.txt", time="5m", hidden_size=256, out="runs/x")

See charrnn.infer.api (inference) and charrnn.training.run (training) for the details; errors are CharRNNError subclasses.
"""

import warnings

# A CPU-only install of torch without numpy warns on import; charrnn never needs numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

__all__ = ["load", "train", "Model", "EvalResult", "CharRNNError", "UsageError", "DataError", "CheckpointError",
           "TextError", "TrainingInterrupted", "__version__"]

from charrnn.errors import CharRNNError, CheckpointError, DataError, TextError, TrainingInterrupted, UsageError  # noqa: E402
from charrnn.version import __version__  # noqa: E402


def __getattr__(name: str):
    # The API imports torch: loaded on first use, so `charrnn --version` and the CLI's
    # usage errors stay fast.
    if name in ("load", "Model", "EvalResult"):
        from charrnn.infer import api

        globals().update(load=api.load, Model=api.Model, EvalResult=api.EvalResult)
        return getattr(api, name)
    if name == "train":  # training is imported only by those who train
        from charrnn.training.run import train

        globals()["train"] = train
        return train
    raise AttributeError(f"module 'charrnn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

"""The Python API: load a trained model, sample it, stream it, score text; train one.

    import charrnn
    model = charrnn.load("runs/tinyshakespeare")          # a run directory or a .pt
    text = model.sample(prime="ROMEO:", length=300, temperature=0.7, seed=1)
    for chunk in model.stream(prime="ROMEO:", length=300, seed=1): ...
    result = model.score(held_out_text)                 # .loss .bpc .perplexity .chars
    summary = charrnn.train("corpus.txt", time="5m", out="runs/x")

Nothing here prints; errors are charrnn.CharRNNError subclasses (UsageError for a bad
setting, DataError for text, CheckpointError for a file). The CLI runs on the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from charrnn import checkpoint
from charrnn.config import EVAL_STREAMS, check_seed, check_streams
from charrnn.device import resolve_device, resolve_dtype
from charrnn.evaluate import EvalResult, evaluate
from charrnn.run import train
from charrnn.sample import SampleSettings, generate

__all__ = ["Model", "load", "train", "EvalResult"]


class Model:
    """A trained model, ready for inference (see `load`)."""

    def __init__(self, payload: checkpoint.Checkpoint, device: str = "auto"):
        self.path = Path(payload.path)
        self.network, self.vocab = checkpoint.restore_model(payload)
        self.device, _ = resolve_device(device)
        self.network.to(self.device).eval()
        self.model_config = self.network.config
        self.step: int = payload.progress.get("step", 0)

    def __repr__(self) -> str:
        config = self.model_config
        return (f"<charrnn.Model {config.num_layers}x{config.hidden_size} {config.cell}, "
                f"{len(self.vocab)} characters, step {self.step}, from {self.path}>")

    @property
    def characters(self) -> str:
        """Every character the model knows, sorted."""
        return self.vocab.chars

    def stream(self, prime: str = "", length: int = 500, temperature: float = 0.8, *, top_k: int = 0,
               top_p: float = 1.0, stop: str = "", seed: int | None = None, unknown: str = "error") -> Iterator[str]:
        """Yield the new text a character at a time as it is generated (the prime is not repeated).

        temperature: below 1 safer, above 1 wilder, 0 greedy. seed: same seed, same text.
        unknown: characters of the prime the model does not know, "error" or "skip"."""
        settings = SampleSettings(length=length, temperature=temperature, top_k=top_k, top_p=top_p, stop=stop)
        settings.validate()
        generator = torch.Generator(self.device)
        if seed is None:
            generator.seed()
        else:
            check_seed(seed)
            generator.manual_seed(seed)
        prime_ids, _ = self.vocab.encode(prime, unknown)
        for chars in generate(self.network, self.vocab, prime_ids, settings, generator=generator, device=self.device):
            if chars[0]:
                yield chars[0]

    def sample(self, prime: str = "", length: int = 500, temperature: float = 0.8, **options: Any) -> str:
        """The prime followed by `length` new characters (options as for `stream`)."""
        return prime + "".join(self.stream(prime, length, temperature, **options))

    def score(self, text: str, unknown: str = "error", streams: int = EVAL_STREAMS) -> EvalResult:
        """Loss (nats/char), .bpc and .perplexity of text, read as `charrnn eval` reads it
        (streams: as its --streams; 1 reads the text as one sequence)."""
        check_streams(streams)
        ids, dropped = self.vocab.encode(text, unknown)
        dtype, _ = resolve_dtype("auto", self.device)
        return evaluate(self.network, ids, self.device, dtype, dropped, max_streams=streams)


def load(path: str | Path | None = None, device: str = "auto") -> Model:
    """A trained model from a run directory (its best.pt) or a .pt file; None: the most
    recent run under ./runs. device: auto, cpu, cuda, cuda:N or mps."""
    return Model(checkpoint.load(path if path is not None else checkpoint.latest_run()), device)

"""The Python API for inference: load a trained model, sample it, stream it, score text.

    import charrnn
    model = charrnn.load("runs/tinyshakespeare")          # a run directory or a .pt
    text = model.sample(prime="ROMEO:", length=300, temperature=0.7, seed=1)
    for chunk in model.stream(prime="ROMEO:", length=300, seed=1): ...
    result = model.score(held_out_text)                 # .loss .bpc .perplexity .chars

This is the one inference path: `charrnn sample`, `eval` and `viz` call these methods,
so a notebook, a server and the shell see the same text and the same figures. A Model
holds the network, its vocabulary and its start mix (the prior over the first
predictions, charrnn.model.startmix), and hands all three to the decoder and the scorer.
Importing it does not import training (`charrnn.train` is charrnn.training.run.train).

Nothing here prints; errors are charrnn.CharRNNError subclasses (UsageError for a bad
setting, DataError for text, CheckpointError for a file). A string that is not valid
Unicode (a lone surrogate) raises TextError, a UsageError and a ValueError, naming the
argument: prime, stop or text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from charrnn.config import EVAL_STREAMS, DynamicSettings, check_seed, check_streams
from charrnn.data.encode import prepare
from charrnn.data.prepared import Progress, ids_in
from charrnn.data.text import rereadable, split
from charrnn.device import autocast, resolve_device, resolve_dtype
from charrnn.errors import DataError, UsageError
from charrnn.infer.evaluate import EvalResult, dynamic_evaluate, evaluate, read
from charrnn.infer.sample import SampleSettings, generate, parse_logit_bias
from charrnn.store import checkpoint
from charrnn.store.rundir import is_run

__all__ = ["Model", "load", "EvalResult"]


class Model:
    """A trained model, ready for inference (see `load`)."""

    def __init__(self, payload: checkpoint.Checkpoint, device: str = "auto"):
        self.path = Path(payload.path)
        # What the run was (not its optimizer state, which inference never needs).
        self.corpus: dict[str, Any] = payload.corpus
        self.train_config: dict[str, Any] = payload.train_config
        self.network, self.vocab = checkpoint.restore_model(payload)
        self.prior = checkpoint.restore_prior(payload)  # the start mix, None when trained without it
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

    @property
    def _lstm(self) -> bool:
        """Its network runs nn.LSTM (oneDNN's kernel on a CPU), for resolve_dtype."""
        return self.model_config.cell == "lstm"

    @property
    def run_dir(self) -> Path | None:
        """The run directory the checkpoint sits in, None for a .pt alone."""
        return self.path.parent if is_run(self.path.parent) else None

    # -- decoding ----------------------------------------------------------------------

    def generate(self, prime_ids: torch.Tensor, settings: SampleSettings, num_samples: int = 1,
                 seed: int | None = None, dtype: str = "fp32") -> Iterator[list[str]]:
        """Yield, step by step, the next character of each of num_samples samples after
        prime_ids ("" for a sample that has written settings.stop). seed: same seed, same
        text (None: a random one). dtype: the decoder's matmul precision for many streams,
        auto (bf16 where fast), fp32 or bf16 (charrnn.infer.decode.matmul_dtype)."""
        generator = torch.Generator(self.device)
        if seed is None:
            generator.seed()
        else:
            check_seed(seed)
            generator.manual_seed(seed)
        matmul, _ = resolve_dtype(dtype, self.device)
        return generate(self.network, self.vocab, prime_ids, settings, num_samples, generator, self.device,
                        dtype=matmul, prior=self.prior)

    def stream(self, prime: str = "", length: int = 500, temperature: float = 0.8, *, top_k: int = 0,
               top_p: float = 1.0, stop: str = "", seed: int | None = None, unknown: str = "error", min_p: float = 0.0,
               frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
               logit_bias: dict[str, float] | None = None) -> Iterator[str]:
        """Yield the new text a character at a time as it is generated (the prime is not repeated).

        temperature: below 1 safer, above 1 wilder, 0 greedy. seed: same seed, same text.
        unknown: characters of the prime the model does not know, "error" or "skip".
        top_k, top_p, min_p, frequency_penalty, presence_penalty, logit_bias ({"e": -100}
        bans "e"; a key of digits is an id): as `charrnn sample`'s flags (charrnn.infer.sample)."""
        settings = SampleSettings(length=length, temperature=temperature, top_k=top_k, top_p=top_p, stop=stop,
                                  min_p=min_p, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                                  logit_bias=parse_logit_bias(self.vocab, logit_bias or {}, "logit_bias"))
        settings.validate()
        prime_ids, _ = self.vocab.encode(prime, unknown, "prime")
        for chars in self.generate(prime_ids, settings, seed=seed):
            if chars[0]:
                yield chars[0]

    def sample(self, prime: str = "", length: int = 500, temperature: float = 0.8, **options: Any) -> str:
        """The prime followed by `length` new characters (options as for `stream`)."""
        return prime + "".join(self.stream(prime, length, temperature, **options))

    # -- scoring -----------------------------------------------------------------------

    def score(self, text: str, unknown: str = "error", streams: int = EVAL_STREAMS, dtype: str = "auto") -> EvalResult:
        """Loss (nats/char), .bpc and .perplexity of text, read as `charrnn eval` reads it
        (streams: as its --streams; 1 reads the text as one sequence). dtype: auto (as
        training picks), fp32, bf16 or fp16."""
        check_streams(streams)
        ids, dropped = self.vocab.encode(text, unknown, "text")
        _enough(ids, dropped)
        precision, _ = resolve_dtype(dtype, self.device, lstm=self._lstm)
        return evaluate(self.network, ids, self.device, precision, dropped, max_streams=streams, prior=self.prior)

    def score_files(self, files: list[str], unknown: str = "error", streams: int = EVAL_STREAMS, dtype: str = "auto",
                    encoding: str = "utf-8", dynamic: DynamicSettings | None = None,
                    on_progress: Progress | None = None, on_notice=None) -> EvalResult:
        """`score` of the text of files (as `charrnn train` reads them: files, directories, "-"),
        prepared once (charrnn.data.prepared) and read in bounded memory whatever its size. With
        `dynamic`, `score_dynamic` of it instead (which holds the ids in memory)."""
        check_streams(streams)
        corpus = prepare(files, encoding, on_progress=on_progress, on_notice=on_notice)
        ids, dropped = ids_in(corpus, self.vocab, unknown)
        _enough(ids, dropped)
        precision, _ = resolve_dtype(dtype, self.device, lstm=self._lstm)
        try:
            if dynamic is None:
                return evaluate(self.network, ids, self.device, precision, dropped, max_streams=streams, prior=self.prior)
            dynamic.validate()
            whole = ids if isinstance(ids, torch.Tensor) else ids[0 : len(ids)]
            return dynamic_evaluate(self.network, whole, self.device, dynamic, precision, dropped, prior=self.prior)
        finally:
            if not isinstance(ids, torch.Tensor):
                ids.close()

    def score_dynamic(self, text: str, settings: DynamicSettings = DynamicSettings(), unknown: str = "error",
                      dtype: str = "auto") -> EvalResult:
        """The loss of text under dynamic evaluation (the model adapts as it reads;
        charrnn.infer.evaluate.dynamic_evaluate). The model is as before afterwards."""
        settings.validate()
        ids, dropped = self.vocab.encode(text, unknown, "text")
        _enough(ids, dropped)
        precision, _ = resolve_dtype(dtype, self.device, lstm=self._lstm)
        return dynamic_evaluate(self.network, ids, self.device, settings, precision, dropped, prior=self.prior)

    @torch.no_grad()
    def log_probs(self, text: str, unknown: str = "error", dtype: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """The ids of text (T,) and the log-probabilities (T-1, V) the model gives each
        character after the first, read as one stream from the start state with the start
        mix, in the precision `score` reads with (dtype: auto, fp32, bf16 or fp16), so that
        `score(text, streams=1)` is their mean's negative, to float rounding."""
        ids, dropped = self.vocab.encode(text, unknown, "text")
        _enough(ids, dropped)
        ids = ids.long().to(self.device)
        precision, _ = resolve_dtype(dtype, self.device, lstm=self._lstm)
        with autocast(self.device, precision):
            logits, _ = read(self.network, ids[None], None, self.prior)
        return ids, logits[0, :-1].float().log_softmax(-1)

    def validation_ids(self) -> tuple[torch.Tensor, str]:
        """The run's validation split (its corpus read again, cut as training cut it) and
        a description of it."""
        corpus = self.corpus
        if self.run_dir is None:
            raise UsageError(f"{self.path} has no run directory beside it, so no validation text; give one with --text FILE")
        if corpus["sources"] == ["-"]:
            raise UsageError("this run was trained on stdin; give the text to analyse with --text FILE")
        val_frac = self.train_config["val_frac"]
        _, val_ids = split(prepare(rereadable(corpus["sources"])).ids_for(self.vocab), val_frac)
        return val_ids, f"validation split of {corpus['name']} (its last {val_frac:.0%})"


def _enough(ids, dropped: int) -> None:
    """DataError unless ids hold two or more characters: the first is only read, so fewer
    leave nothing to score (a loss of NaN, which JSON cannot carry)."""
    if len(ids) < 2:
        unknown = f" once {dropped} unknown character(s) were dropped" if dropped else ""
        raise DataError(f"nothing to score: the text has {len(ids)} character(s) the model knows{unknown}; "
                        "scoring needs two or more (the first is only read)")


def load(path: str | Path | None = None, device: str = "auto") -> Model:
    """A trained model from a run directory (its best.pt) or a .pt file; None: the most
    recent run under ./runs. device: auto, cpu, cuda, cuda:N or mps."""
    return Model(checkpoint.load(path if path is not None else checkpoint.latest_run()), device)

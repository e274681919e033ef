"""Typed, frozen configuration: defaults < TOML file < command-line flags.

A config file has two tables, ``[model]`` and ``[train]``, whose keys are the field
names below (the CLI flag is the same name with dashes: ``hidden_size`` is
``--hidden-size``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from charrnn.celltypes import CELL_TYPES, CELLS
from charrnn.errors import UsageError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib



def setting(default: Any, help: str, *, flags: tuple[str, ...] = (), show: str | None = None) -> Any:
    """A config field declared once: its default, the one-line help its flag shows, the
    flag's spellings when they are not just `--field-name`, and what --help shows as the
    default when that is not the value itself. The CLI derives `charrnn train`'s flags from
    these; TOML keys are the field names; validation names both (see _check)."""
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags, "show": show})


@dataclass(frozen=True)
class ModelConfig:
    # Recurrent cell: lstm (default, cuDNN on CUDA), gru or rnn (tanh) as baselines,
    # peephole or layernorm (hand-written LSTMs, charrnn.model.cells).
    cell: str = setting("lstm", "Recurrent cell: lstm, gru, rnn, peephole or layernorm.")
    # Width of the character embedding. 256, not the 64 a vocabulary of ~100 symbols seems
    # to need: 64 N(0, 1) inputs drive the gates too weakly at first, and a 64-wide
    # embedding fell far behind at equal steps (docs/benchmarks.md, "The recipe").
    embedding_size: int = setting(256, "Character embedding width.")
    # Units per recurrent layer. `charrnn train` chooses it for the corpus and the budget
    # unless given (charrnn.training.sizing); 512 is what the library builds when asked for nothing.
    hidden_size: int = setting(512, "Units per layer.", show="chosen for the text and budget (512 in the library)")
    # Stacked recurrent layers; 2 is char-rnn's default and the sweet spot for ~1 MB.
    num_layers: int = setting(2, "Stacked recurrent layers.")
    # Dropout between layers and before the output head. `charrnn train` chooses it from
    # the passes the run makes over the text unless given (charrnn.training.sizing); 0.35 is the
    # most the ramp gives, for a model that sees its text many times.
    dropout: float = setting(0.35, "Dropout between layers and before the head.", show="chosen for the text and budget (0.35 in the library)")
    # Dropout on h_{t-1} inside the recurrence, one mask per sequence (peephole and
    # layernorm cells only); 0 = off.
    recurrent_dropout: float = setting(0.0, "Dropout on h_{t-1}, one mask per sequence (peephole/layernorm cells).")
    # DropConnect on the recurrent weights W_hh (AWD-LSTM's weight drop): one mask per
    # forward call, shared by every time step and sequence; regularises the recurrence
    # without touching the fused nn.LSTM kernel. 0 = off. A new run chooses it from its
    # passes over the text (charrnn.training.sizing.weight_drop_for).
    weight_drop: float = setting(0.0, "DropConnect on the recurrent weights W_hh (AWD-LSTM weight drop), one mask per forward.",
                                 show="0-0.3, chosen from the passes over the text (0 in the library)")
    # Dropout on the character embeddings (whole vectors' entries, like the other dropouts).
    embedding_dropout: float = setting(0.0, "Dropout on the character embeddings.")
    # Weight initialisation. "default": PyTorch's uniform(+-1/sqrt(H)), which keeps the
    # gates out of saturation at any width; "orthogonal": orthogonal recurrent matrices
    # (per gate), whose singular values of 1 neither shrink nor blow up h across steps at
    # the start, the usual remedy for vanishing/exploding gradients in plain RNNs;
    # "uniform": char-rnn's uniform(+-0.08), for comparisons with it.
    init: str = setting("default", "Weight init: default (PyTorch), orthogonal (recurrent) or uniform (char-rnn's +-0.08).")
    # Initial forget-gate bias of LSTM cells: 1 keeps the gates open so gradients flow
    # back through time from the first step (Gers et al. 2000; Jozefowicz et al. 2015).
    forget_bias: float = setting(1.0, "Initial forget-gate bias of LSTM cells.")

    def validate(self) -> None:
        _check_finite(self)
        _check(self.cell in CELLS, "cell", f"must be one of {', '.join(CELLS)}, not {self.cell!r}")
        _check(1 <= self.embedding_size <= MAX_WIDTH, "embedding_size", f"must be from 1 to {MAX_WIDTH}")
        _check(1 <= self.hidden_size <= MAX_WIDTH, "hidden_size", f"must be from 1 to {MAX_WIDTH}")
        _check(1 <= self.num_layers <= 64, "num_layers", "must be from 1 to 64")
        _check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        _check(0.0 <= self.recurrent_dropout < 1.0, "recurrent_dropout", "must be in [0, 1)")
        _check(0.0 <= self.embedding_dropout < 1.0, "embedding_dropout", "must be in [0, 1)")
        _check(0.0 <= self.weight_drop < 1.0, "weight_drop", "must be in [0, 1)")
        _check(abs(self.forget_bias) <= 100, "forget_bias", "must be from -100 to 100 (sigmoid(20) is already 1 in float32)")
        _check(self.init in ("default", "orthogonal", "uniform"), "init", "must be default, orthogonal or uniform")
        _check(self.recurrent_dropout == 0.0 or self.cell not in CELL_TYPES or CELL_TYPES[self.cell].hand_written, "recurrent_dropout",
               "needs a hand-written cell (--cell peephole or layernorm)")


@dataclass(frozen=True)
class TrainConfig:
    # Sequences per step; in stateful mode, the number of parallel streams of the corpus.
    # Unless given, charrnn train chooses it for the device and cell (charrnn.training.sizing.batch_for).
    batch_size: int = setting(64, "Sequences (streams) per step.", flags=("--batch-size", "-b"),
                              show="16 for the LSTM on a CPU, else 64 (64 in the library)")
    # Characters per sequence: how far back-propagation through time is truncated.
    seq_len: int = setting(100, "BPTT length in characters.", flags=("--seq-len", "-t"))
    # Peak AdamW learning rate, reached after warmup: held, it beat the plain loop's 2e-3
    # at equal steps and is stable with clipping (docs/benchmarks.md, "The recipe"). Unless
    # given, charrnn train doubles it for a run that reads its text many times
    # (charrnn.training.sizing.learning_rate_for: 3e-3 up to 3 passes, 6e-3 from 8); the
    # library's 3e-3 is what fine-tuning keeps.
    learning_rate: float = setting(3e-3, "Peak AdamW learning rate.", flags=("--learning-rate", "--lr"),
                                   show="3e-3 up to 3 passes over the text, 6e-3 from 8 (3e-3 in the library)")
    # The learning rate decays (cosine) to learning_rate * min_lr_ratio at the end.
    min_lr_ratio: float = setting(0.05, "Final learning rate as a fraction of the peak (cosine decay).")
    # The learning rate holds its peak, then decays (cosine) over this last fraction of the
    # run: 1 = cosine over the whole run; less keeps the rate high while the model is far
    # from done (a decay over the whole of a short run lost much of it: docs/benchmarks.md).
    decay_frac: float = setting(0.2, "Hold the peak learning rate, then decay over this last fraction of the run (1 = cosine over all of it).")
    # Linear warmup steps: keeps the first updates of a fresh model from overshooting.
    warmup_steps: int = setting(50, "Linear warmup steps.")
    # AdamW decoupled weight decay on weight matrices (not biases, norms or the start
    # state). Unless given, charrnn train chooses it from the passes the run makes over
    # the text, as it does the dropout, and from its steps (charrnn.training.sizing.weight_decay_for:
    # 0.01 up to 4.5 passes and 5,500 steps, 0.2 from 7 passes or 9,000 steps); the
    # library's 0.01 is what fine-tuning keeps, so a short run on
    # new text does not pull the parent's weights toward zero.
    weight_decay: float = setting(0.01, "AdamW weight decay on weight matrices.",
                                  show="0.01-0.2, chosen from the passes and steps (0.01 in the library)")
    # AdamW's second-moment decay: how many steps (~1 / (1 - beta2)) the per-weight scale
    # of a step averages over. 0.99, as nanoGPT's shakespeare_char (0.999, torch-rnn's,
    # lost 0.003 at equal steps, 0.012 in 5 minutes; char-rnn's RMSprop used 0.95, level with
    # 0.9 and 0.99 within noise: docs/benchmarks.md, "The optimizer's second moment").
    beta2: float = setting(0.99, "AdamW's second-moment decay (char-rnn's RMSprop: 0.95; torch-rnn: 0.999).")
    # Clip the global gradient norm to this (0 = off): the cure for exploding gradients.
    grad_clip: float = setting(1.0, "Clip the global gradient norm (0 = off).")
    # "norm" clips the global gradient norm; "value" clips each element to
    # [-grad_clip, grad_clip], as char-rnn does.
    clip_mode: str = setting("norm", "Clip the global norm (norm) or each element (value, as char-rnn).")
    # Stateless mode: leave the first burn_in predictions of each window out of the loss
    # (they were made from an all-zero state, with almost no context).
    burn_in: int = setting(0, "Stateless mode: predictions left out of the loss at the start of each window.")
    # Weight averaging: validation, best.pt and sampling use an exponential moving average
    # of the weights with this decay (0 = off; see charrnn.training.average). A new run chooses it
    # from its passes over the text (charrnn.training.sizing.ema_decay_for); the library's 0 is what
    # fine-tuning keeps.
    ema_decay: float = setting(0.0, "Validate, keep best.pt and sample with a moving average of the weights of this decay (0 = off).",
                               show="0.998 from 8 passes over the text, else 0 (0 in the library)")
    # Stateful mode: the chance per step that a stream jumps to a random place in the text
    # and starts again from the learned start state (0 = fixed streams, reset each epoch,
    # as char-rnn). See charrnn.data.batches.RestartingStreams.
    stream_restart: float = setting(0.0, "Stateful: chance per step that a stream restarts from the start state at a random place.")
    # Stop after this many optimizer steps (0 = no step limit).
    steps: int = setting(0, "Stop after this many steps (0 = no step limit; with no --epochs or --time either, 10 epochs).")
    # Stop after this many passes over the training split (0 = no epoch limit).
    epochs: float = setting(0.0, "Stop after this many epochs.", show="10 when no --steps/--time")
    # Stop after this much wall-clock time, e.g. "90s", "10m", "1h30m" ("" = no limit).
    # With no steps, epochs or time given, training runs for 10 epochs.
    time: str = setting("", "Stop after this wall-clock time: 90s, 10m, 1h30m.", show="no limit")
    # Evaluate on the whole validation split (and save last.pt) every this many steps.
    # Unless given it follows the batch (given or chosen): 12,800 sequences apart.
    eval_every: int = setting(200, "Validate (and save last.pt) every N steps.",
                              show="12,800 sequences apart: 200 steps of 64, 800 of 16")
    # Also save last.pt whenever this much training time has passed since the last save
    # ("" = only at validations), so a crash or kill -9 loses at most this much work
    # however far apart validations are; 5 minutes costs a 2x512 run under 1 % of its time.
    save_every: str = setting("5m", "Also save last.pt after this much training time without a validation: 90s, 5m ('' = only at validations).")
    # Fraction of the corpus, taken from its end, held out for validation.
    val_frac: float = setting(0.1, "Fraction of the corpus (its end) held out for validation.")
    # Seed for initialisation, dropout and batch order: same seed, same run.
    seed: int = setting(1337, "Random seed.")
    # Random windows, each read from the learned start state (default), instead of
    # streams whose state is carried across batches: a batch of 64 random places of the
    # text teaches more than the next 100 characters of 64 fixed places, and every window
    # trains the start state that sampling and eval begin from (docs/benchmarks.md).
    stateless: bool = setting(True, "Random windows read from the learned start state, or streams with state carried across batches.", flags=("--stateless/--stateful",), show="stateless")
    # The start mix (charrnn.model.startmix): a k-gram model of the training split, the prior
    # that sampling, eval and viz mix into the first 10 predictions read from the start
    # state, its weights fit at each validation (docs/benchmarks.md, "The start mix").
    start_mix: bool = setting(True, "Mix a k-gram model of the text into the first 10 predictions read from the start state.", flags=("--start-mix/--no-start-mix",), show="on")
    # Autocast precision: auto picks bf16 where the hardware runs it fast, else fp32.
    dtype: str = setting("auto", "Precision: auto, fp32, bf16 or fp16.")
    # auto, cpu, cuda, cuda:N or mps.
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps.")
    # Characters sampled to stderr at each evaluation (0 = none).
    sample_length: int = setting(200, "Characters sampled to stderr at each validation (0 = none).")

    def validate(self) -> None:
        _check_finite(self)
        _check(1 <= self.batch_size <= MAX_BATCH, "batch_size", f"must be from 1 to {MAX_BATCH}")
        _check(1 <= self.seq_len <= MAX_BATCH, "seq_len", f"must be from 1 to {MAX_BATCH}")
        _check(0 < self.learning_rate <= 1, "learning_rate", "must be in (0, 1]")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        _check(0 <= self.decay_frac <= 1, "decay_frac", "must be in [0, 1]")
        _check(0 <= self.warmup_steps <= MAX_COUNT, "warmup_steps", f"must be from 0 to {MAX_COUNT}")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(0 <= self.beta2 < 1, "beta2", "must be from 0 to below 1")
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        _check(self.clip_mode in ("norm", "value"), "clip_mode", "must be norm or value")
        _check(0 <= self.burn_in < self.seq_len, "burn_in", "must be >= 0 and below seq_len")
        _check(self.burn_in == 0 or self.stateless, "burn_in", "applies to --stateless training only")
        _check(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1) (0 = off)")
        _check(0 <= self.stream_restart <= 1, "stream_restart", "must be in [0, 1]")
        _check(self.stream_restart == 0 or not self.stateless, "stream_restart", "applies to stateful training only (add --stateful)")
        _check(0 <= self.steps <= MAX_COUNT, "steps", f"must be from 0 (no step limit) to {MAX_COUNT}")
        _check(self.epochs >= 0, "epochs", "must be >= 0")
        parse_duration(self.time)
        try:
            parse_duration(self.save_every)
        except UsageError:
            _check(False, "save_every", f"must be a positive duration like 90s, 5m or 1h, or \"\" for off, not {self.save_every!r}")
        _check(1 <= self.eval_every <= MAX_COUNT, "eval_every", f"must be from 1 to {MAX_COUNT}")
        _check(0 <= self.seed <= MAX_SEED, "seed", f"must be an integer from 0 to {MAX_SEED}")
        _check(0 < self.val_frac < 1, "val_frac", "must be in (0, 1)")
        _check(self.dtype in ("auto", "fp32", "bf16", "fp16"), "dtype", "must be auto, fp32, bf16 or fp16")
        _check(0 <= self.sample_length <= MAX_SAMPLE, "sample_length", f"must be from 0 to {MAX_SAMPLE}")

    @property
    def time_budget_s(self) -> float:
        return parse_duration(self.time)

    @property
    def stop_text(self) -> str:
        """The stop conditions in words: "5000 steps, 10 epochs, 5m" (those given)."""
        return stop_text(self.steps, self.epochs, self.time)

    def with_default_stop(self) -> "TrainConfig":
        """Train for 10 epochs when no stop condition was given."""
        if self.steps or self.epochs or self.time:
            return self
        return dataclasses.replace(self, epochs=10.0)


def stop_text(steps: int, epochs: float, time: str) -> str:
    """Stop conditions in words, as the setup line and the sizing reason say them."""
    return ", ".join(p for p in (f"{steps} steps" if steps else "", f"{epochs:g} epochs" if epochs else "", time) if p)


@dataclass(frozen=True)
class DynamicSettings:
    """Dynamic evaluation (Krause et al. 2018): after scoring each segment of the text,
    take one gradient step on it, so the model adapts to the text as it reads it::

        ms    <- beta ms + (1 - beta) g^2                  (RMS of the gradients so far)
        theta <- theta - lr g / (sqrt(ms) + eps) + decay (theta_0 - theta)

    theta_0 are the trained weights, which the decay pulls back toward. Every character
    is still scored before the model has trained on it, so the figure is a fair loss of
    a model allowed to learn as it reads, a different protocol from plain eval."""

    # lr above; 0 = static evaluation. 1e-3 was the best of four step sizes tried
    # (docs/benchmarks.md, "Evaluation").
    step_size: float = 1e-3
    decay: float = 0.01  # pull toward the trained weights per step
    segment: int = 50  # characters scored between two updates
    streams: int = 8  # contiguous parts of the text read side by side (fewer: more, smaller steps)
    beta: float = 0.99
    eps: float = 1e-8

    def validate(self) -> None:
        if not 0 <= self.step_size <= 1:  # RMS-normalised: a step of 1 already moves every weight by ~1
            raise UsageError(f"--step-size must be in [0, 1] (0 = static), not {self.step_size}")
        if not 0 <= self.decay <= 1:
            raise UsageError(f"--decay must be in [0, 1], not {self.decay}")
        if not 1 <= self.segment <= MAX_BATCH:
            raise UsageError(f"--segment must be from 1 to {MAX_BATCH}, not {self.segment}")


MAX_SEED = 2**62  # torch takes 64-bit seeds; runs add offsets (seed + 1, seed + step)
MAX_WIDTH = 1 << 16  # hidden and embedding sizes: far beyond what fits in memory
MAX_BATCH = 1 << 20  # sequences per batch, characters per sequence, samples per call
MAX_COUNT = 2**62  # steps and step counts: "no practical limit" that still fits int64
MAX_SAMPLE = 100_000  # characters sampled to stderr at each validation
EVAL_STREAMS = 64  # streams a text is scored in side by side (charrnn.infer.evaluate; eval --streams)


def _check_finite(config) -> None:
    """nan and infinity are never a setting: name the first float field that holds one."""
    for field in fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            _check(False, field.name, f"must be a finite number, not {value}")


def check_seed(seed: int, flag: str = "--seed") -> None:
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{flag} must be an integer from 0 to {MAX_SEED}, not {seed}")


def check_streams(streams: int) -> None:
    """The streams a text is scored in (eval --streams, Model.score): a whole number >= 1."""
    if not isinstance(streams, int) or isinstance(streams, bool) or not 1 <= streams <= MAX_BATCH:
        raise UsageError(f"--streams must be a whole number from 1 to {MAX_BATCH}, not {streams!r}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UsageError(f"{key} {message} (flag --{key.replace('_', '-')}, config key {key})")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([hms])")


def parse_duration(text: str) -> float:
    """'90' or '90s' -> 90.0, '10m' -> 600.0, '1h30m' -> 5400.0, '' -> 0.0 (no limit).

    Anything else, a negative, zero, nan or infinite time included, is a usage error
    that shows the accepted forms."""
    text = str(text).strip().lower()
    if not text:
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise UsageError(f"time {text!r} is not a duration; use seconds or a form like 90s, 10m or 1h30m "
                             "(flag --time, config key time)") from None
        scale = {"h": 3600.0, "m": 60.0, "s": 1.0}
        seconds = sum(float(n) * scale[u] for n, u in parts)
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"time {text!r} must be a positive, finite duration like 90s, 10m or 1h30m "
                         "(flag --time, config key time; leave it out for no time limit)")
    return seconds


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def _coerce(cls, key: str, value: Any) -> Any:
    """Check a TOML/CLI value against the field's type, allowing int for float."""
    kind = {f.name: f.type for f in fields(cls)}[key]
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind == "str" and key in ("time", "save_every") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    expected = {"int": int, "float": float, "str": str, "bool": bool}[kind]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise UsageError(f"config key {key} must be {kind}, not {value!r}")
    return value


def build(cls, *layers: dict[str, Any]):
    """A config from its defaults overridden by each layer in turn (None = not given)."""
    valid = field_names(cls)
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None:
                continue
            if key not in valid:
                raise UsageError(f"unknown {cls.__name__} key {key!r}; valid keys: {', '.join(valid)}")
            values[key] = _coerce(cls, key, value)
    config = cls(**values)
    config.validate()
    return config


def load_toml(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The [model] and [train] tables of a config file, unvalidated."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"config file {str(path)!r} is a directory; give a .toml file (see configs/)") from None
    except OSError as err:
        raise UsageError(f"config file {path} cannot be read: {err.strerror}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"config file {path} is not valid TOML: {err}") from None
    unknown = set(data) - {"model", "train"}
    if unknown:
        raise UsageError(f"config file {path}: unknown table(s) {sorted(unknown)}; valid tables: model, train")
    return dict(data.get("model", {})), dict(data.get("train", {}))


def to_toml(model: ModelConfig, train: TrainConfig) -> str:
    """The resolved config as a TOML file that `--config` reads back."""
    lines = ["# Resolved charrnn configuration of this run (charrnn train --config reads it).", ""]
    for name, config in (("model", model), ("train", train)):
        lines.append(f"[{name}]")
        for key, value in dataclasses.asdict(config).items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)

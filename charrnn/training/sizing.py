"""Defaults that fit the corpus, the budget and the device: the model's width, its
regularisation (below), and the batch (`batch_for`).

A fixed 2x512 with dropout 0.35 suits ~1 MB in 10 CPU minutes and little else: on a
big text in a short budget it sees too few characters to learn what a smaller model
learns, and on a small text in a long one a bigger, more regularised model does better.
So when neither a flag nor a config file sets them, `charrnn train` chooses:

1. **How many characters the run will read**, D(H) for each candidate width H: the
   step or epoch limit says so directly; a time limit is multiplied by the training
   speed of that width on this machine, measured by a few real steps (the probe; a
   GPU's probe is its own figure, and the same rule follows from it).
2. **The width**: the widest H whose run reads at least K(D) characters per parameter,
   D(H) >= K(D) P(H), where K grows with what the run reads: K(D) = CHARS_PER_PARAMETER
   (D / ANCHOR_CHARS) ** GROWTH (`chars_per_parameter`). Fewer, and the model is too big
   to learn in the budget; many more, and a wider one would have learned more. K grows
   because a longer run's best model is smaller than a constant K makes it: the
   parameters of the best width grow as D ** (1 / (1 + GROWTH)), not as D (Chinchilla's
   rule for transformers keeps K constant). More time never picks a smaller model.
3. **The dropout**, from the passes over the training text E = D(H) / N: none while
   each character is seen three times or less (nothing to overfit yet), rising to
   MAX_DROPOUT once it is seen ~23 times (small texts, long budgets).
4. **The weight decay**, from the same passes or the run's length in steps: AdamW's 0.01
   up to 4.5 passes and 5,500 steps, rising to 0.2 at 7 passes or 9,000 steps, whichever
   comes first (`weight_decay_for`).
5. **The peak learning rate**, from the same passes: the library's 3e-3 up to 3 passes,
   twice that from 8 on (`learning_rate_for`): where a run reads its text many times a
   higher rate, annealed by the schedule's decay, ends lower; where it reads it once or
   twice it only learns worse.
6. **Many passes**: a moving average of the weights read by validation, best.pt and
   samples from 8 passes on (`ema_decay_for`), and a weight drop on the recurrent
   weights from 25 (`weight_drop_for`): without them a run that reads its text 50 times
   memorises it over its last part and picks its best.pt from noisy readings.

Items 3-6 are for new runs; fine-tuning keeps the library's values. The measurements
behind each number are in docs/benchmarks.md ("Why each default is what it is").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from charrnn.celltypes import CELL_TYPES
from charrnn.config import ModelConfig, TrainConfig
from charrnn.device import autocast, optimizer_kernels

# 192 keeps the step small where a short budget sits at the 256 bar, which the
# machine's own speed (+-20 % minute to minute) moves a run across.
WIDTHS = (128, 192, 256, 384, 512, 768, 1024)
# K(D) = 2.4 at 2.65M characters (pydocs in 90 CPU seconds: 2x256 won at 2.4), growing as
# D ** 0.27: of the growths that agree with all five measured pairs of widths from 90
# seconds to 20 minutes (0.15-0.41), the one with equal margins to the two that bound it
# (docs/benchmarks.md, "The width, from the budget"; scripts/sizing_sweep.py --fit).
CHARS_PER_PARAMETER = 2.4
ANCHOR_CHARS = 2.65e6
GROWTH = 0.27
MAX_DROPOUT = 0.35
SIZED = ("hidden_size", "dropout", "weight_drop")  # the model fields chosen here unless given
SIZED_TRAIN = ("batch_size", "eval_every")  # and the training fields (fine-tuning too)
SIZED_FROM_PASSES = ("weight_decay", "ema_decay", "learning_rate")  # chosen from the passes, as the dropout, for new runs only
MIN_WEIGHT_DECAY, MAX_WEIGHT_DECAY = 0.01, 0.2
WEIGHT_DECAY_STEPS = (5_500.0, 9_000.0)  # a long run gets the decay however few its passes
EMA_FROM_PASSES, EMA_DECAY = 8.0, 0.998
MIN_LEARNING_RATE = TrainConfig().learning_rate  # the library's peak up to 3 passes, twice it from 8
MAX_LEARNING_RATE, LEARNING_RATE_PASSES = 2 * MIN_LEARNING_RATE, (3.0, 8.0)
MAX_WEIGHT_DROP = 0.3
MIN_PROBED_BUDGET_S = 60.0  # shorter time budgets are not worth a probe of a few seconds


@dataclass(frozen=True)
class Choice:
    hidden_size: int
    dropout: float
    chars: float  # characters the run is expected to read
    epochs: float  # passes over the training text that makes
    chars_per_s: float | None  # probed training speed of that width (time budgets)
    probe_s: float  # seconds the probe took (they count against a time budget)

    steps: float = 0.0  # optimizer steps the run is expected to take

    @property
    def weight_decay(self) -> float:
        return weight_decay_for(self.epochs, self.steps)

    @property
    def weight_drop(self) -> float:
        return weight_drop_for(self.epochs)

    @property
    def ema_decay(self) -> float:
        return ema_decay_for(self.epochs)

    @property
    def learning_rate(self) -> float:
        return learning_rate_for(self.epochs)

    def reason(self, train_chars: int, budget: str) -> str:
        speed = f" at ~{self.chars_per_s / 1000:,.0f}k chars/s (probed)" if self.chars_per_s else ""
        limit = (f" (the budget, not the text, limits what is read: {self.epochs:.1%} of it)"
                 if self.epochs < 1 else "")
        return (f"{budget} on {train_chars / 1e6:.2f}M characters{speed}: ~{self.chars / 1e6:.1f}M characters read, "
                f"{self.epochs:.1f} passes over the text{limit}")


def batch_for(device: torch.device, cell: str = "lstm", ranks: int = 1) -> tuple[int, str]:
    """The (global) batch size for this device, cell and number of ranks, and why.

    On a CPU a step of the fused nn.LSTM costs about the same per character at a batch of
    16 as at 64, so smaller batches buy more optimizer steps for the same characters, and
    each learns about as much. The other cells lose a third of their speed at 16 and did
    worse there, so they keep 64. A GPU runs a batch of 64 in about the time of one of 16;
    64 stays its default (not tuned for quality on a GPU). Measured in docs/benchmarks.md
    ("A batch of 16 on a CPU").
    """
    if device.type == "cpu" and cell == "lstm":  # per rank: each CPU rank has cores of its own
        return 16 * ranks, "on a CPU, smaller batches learn more per minute"
    if device.type == "cpu":
        return 64 * ranks, f"on a CPU, a {cell} runs a batch of 16 at ~2/3 of the speed of 64"
    return -(-64 // ranks) * ranks, f"on {device.type.upper()}, a bigger batch costs little time"  # 64, or up to a multiple of the ranks


def eval_every_for(batch_size: int) -> int:
    """Steps between validations that keep them as many sequences apart as the library's
    defaults do (200 steps of 64: every 800 steps at 16)."""
    library = TrainConfig()
    return max(1, library.eval_every * library.batch_size // batch_size)


def parameters(config: ModelConfig, vocab_size: int) -> int:
    """Parameters of a CharRNN with this config (the embedding, the recurrent stack, the head)."""
    cell = CELL_TYPES[config.cell]
    gates, h, e = cell.gates, config.hidden_size, config.embedding_size
    extra = cell.extra_parameters(h)  # peephole diagonals; layer-norm gains and shifts
    recurrent = sum(gates * h * ((e if layer == 0 else h) + h + 2) + extra for layer in range(config.num_layers))
    return vocab_size * e + recurrent + (h + 1) * vocab_size


def chars_per_parameter(chars: float) -> float:
    """K(D): the characters per parameter a run that reads D characters should have.
    CHARS_PER_PARAMETER at ANCHOR_CHARS, growing as a power of D (the module docstring)."""
    return CHARS_PER_PARAMETER * (chars / ANCHOR_CHARS) ** GROWTH


def dropout_for(epochs: float) -> float:
    """No dropout up to 3 passes over the text, MAX_DROPOUT from 23 on, linear between."""
    return round(MAX_DROPOUT * _ramp(epochs, 3.0, 23.0), 2)


def weight_decay_for(epochs: float, steps: float = 0.0) -> float:
    """AdamW's decay on the weight matrices: MIN_WEIGHT_DECAY up to 4.5 passes over the
    text, MAX_WEIGHT_DECAY from 7 on, linear between; or, whichever is higher, the same
    ramp over the run's steps (WEIGHT_DECAY_STEPS). In a short run the decay only slows
    learning; where the model starts to memorise, it generalises better, and in a long run
    it pays however few the passes (AdamW's decay pulls the weights over ~1 / (lr decay)
    = 1,700 steps at 3e-3 and 0.2: a run several times that long settles under it; cf.
    Andriushchenko et al. 2023 on weight decay in one-pass training). Measured: 0.2 lost
    at 2,800 steps (4.5 passes) and ~3,700 (2 passes), won at ~5,500 (9 passes) and 9,800
    (Python source, 3.5 passes: 0.9622 against 0.9882); between them the lines are drawn
    (docs/benchmarks.md, "The weight decay").
    """
    ramp = max(_ramp(epochs, 4.5, 7.0), _ramp(steps, *WEIGHT_DECAY_STEPS))
    return round(MIN_WEIGHT_DECAY + (MAX_WEIGHT_DECAY - MIN_WEIGHT_DECAY) * ramp, 3)


def weight_drop_for(epochs: float) -> float:
    """DropConnect on the recurrent weights (AWD-LSTM's weight drop): none up to 25 passes
    over the text, MAX_WEIGHT_DROP from 50, linear between. Past ~25 passes dropout 0.35
    no longer stops a model from memorising the text late in the run; the weight drop
    does, where earlier it only slows learning (docs/benchmarks.md, "Many passes")."""
    return round(MAX_WEIGHT_DROP * _ramp(epochs, 25.0, 50.0), 2)


def ema_decay_for(epochs: float) -> float:
    """Validation, best.pt and samples read a moving average of the weights (decay
    EMA_DECAY, ~500 steps) from EMA_FROM_PASSES passes over the text on; below, the raw
    weights. Where a run makes many passes its raw weights swing from one validation to
    the next and start to memorise late in the run; the average reads what the run has
    learned, not the luck of the step it was read at (docs/benchmarks.md, "Many passes")."""
    return EMA_DECAY if epochs >= EMA_FROM_PASSES else 0.0


def learning_rate_for(epochs: float) -> float:
    """The peak learning rate: the library's (MIN_LEARNING_RATE, 3e-3) up to 3 passes over
    the text, MAX_LEARNING_RATE (twice it) from 8 on, linear between. A run that reads its text many
    times is limited by what it memorises, and a higher rate, annealed by the schedule's
    decay, settles where the model generalises better (the rate's noise regularises, as
    the dropout and the weight decay do); a run that reads its text once or twice is
    limited by what it learns, and a higher rate learns worse. Measured at 5 minutes on
    a 2x256 (docs/benchmarks.md, "The peak learning rate"): Tiny Shakespeare (9 passes)
    1.4706 at 2e-3, 1.4535 at 3e-3, 1.4432 at 7e-3; pydocs in 2 minutes (7.8 passes)
    1.1124 at 3e-3, 1.0799 at 7e-3; Python source (2 passes) 1.0505 at 3e-3, 1.0759 at 7e-3."""
    ramp = _ramp(epochs, *LEARNING_RATE_PASSES)
    return float(f"{MIN_LEARNING_RATE + (MAX_LEARNING_RATE - MIN_LEARNING_RATE) * ramp:.2g}")  # 5.5e-3, as the size line reads


def _ramp(epochs: float, start: float, end: float) -> float:
    """0 up to `start` passes, 1 from `end` on, linear between."""
    return min(1.0, max(0.0, (epochs - start) / (end - start)))


def choose(model: ModelConfig, train: TrainConfig, train_chars: int, vocab_size: int, device: torch.device,
           dtype: torch.dtype | None, probe: bool = True, widths: tuple[int, ...] = WIDTHS,
           speed_of: Callable[[int], float] | None = None) -> Choice:
    """The width, dropout and weight decay for this corpus and stop condition (see the module docstring).
    widths: the candidates; a width that was given is the only one, so the dropout follows
    the passes that width makes, not those of the width that would have been chosen.
    speed_of: training chars/s as a function of the width, for a time budget; None: probed
    here (`probed_speeds`). Given, it stands for another machine's probe (tests, tables)."""
    budget = train.with_default_stop()
    started = time.perf_counter()
    if budget.time and speed_of is None:
        if probe and budget.time_budget_s >= MIN_PROBED_BUDGET_S:
            speed_of = probed_speeds(model, train, vocab_size, device, dtype)
        else:  # too short a budget to spend on a probe: a 2-core CPU's speeds
            speed_of = lambda hidden: 40_000.0 * (256 / hidden) ** 0.75
    chosen = None
    for hidden in widths:
        candidate = replace(model, hidden_size=hidden)
        speed = None
        chars = math.inf
        if budget.steps:
            chars = min(chars, budget.steps * train.batch_size * train.seq_len)
        if budget.epochs:
            chars = min(chars, budget.epochs * train_chars)
        if budget.time:
            speed = speed_of(hidden)  # may time this width now: a probe's seconds count against the budget
            probe_s = time.perf_counter() - started
            chars = min(chars, speed * max(0.0, budget.time_budget_s - probe_s) * 0.9)  # validations take the rest
        fits = 0 < chars >= chars_per_parameter(chars) * parameters(candidate, vocab_size)
        if fits or chosen is None:
            chosen = (hidden, chars, speed)
        if not fits:
            break  # wider ones read even less per parameter
    hidden, chars, speed = chosen
    epochs = chars / max(1, train_chars)
    steps = chars / (train.batch_size * train.seq_len)
    return Choice(hidden, dropout_for(epochs), chars, epochs, speed, time.perf_counter() - started, steps)


def probed_speeds(model: ModelConfig, train: TrainConfig, vocab_size: int, device: torch.device,
                  dtype: torch.dtype | None) -> Callable[[int], float]:
    """Training chars/s as a function of the width: 256 and 512 timed now, a power law
    between and below them (on CPUs wider layers use the cores better than their FLOPs
    suggest: 2x512 trains at ~0.35-0.6x the chars/s of 2x256, not at the 0.3x of its
    FLOPs); a width above 512 is timed itself when asked for (only a long budget gets
    there), since past 512 a CPU's speed falls faster than the law (2x1024: 0.18x of
    2x512 measured, 0.34x by the law)."""
    low, high = 256, 512
    measured = {width: probe_speed(replace(model, hidden_size=width), train, vocab_size, device, dtype)
                for width in (low, high)}
    exponent = math.log(measured[low] / measured[high]) / math.log(high / low)
    exponent = min(2.0, max(0.0, exponent))  # noise cannot make wider faster, or worse than FLOPs

    def speed(hidden: int) -> float:
        if hidden > high and hidden not in measured:
            measured[hidden] = probe_speed(replace(model, hidden_size=hidden), train, vocab_size, device, dtype)
        return measured.get(hidden) or measured[low] * (low / hidden) ** exponent

    return speed


def probe_speed(model: ModelConfig, train: TrainConfig, vocab_size: int, device: torch.device,
                dtype: torch.dtype | None, chars: int = 12_800) -> float:
    """Training characters per second of this model on this machine: one warm-up step,
    then timed ones covering at least `chars` characters (two steps of 64 x 100; eight
    of 16 x 100, whose single steps are too short to time), on random ids (forward,
    backward, optimizer step)."""
    from charrnn.model.network import CharRNN

    torch_state = torch.get_rng_state()  # the run's own random streams are left as they were
    try:
        net = CharRNN(model, vocab_size).to(device).train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, **optimizer_kernels(device.type))  # as the trainer's
        x = torch.randint(0, vocab_size, (train.batch_size, train.seq_len + 1), device=device)

        def step():
            with autocast(device, dtype):
                logits, _ = net(x[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        steps = max(2, math.ceil(chars / (train.batch_size * train.seq_len)))
        step()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * train.batch_size * train.seq_len / (time.perf_counter() - started)
    finally:
        torch.set_rng_state(torch_state)

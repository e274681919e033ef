"""Decoding: warm the state on a prime, then draw one character at a time.

Each draw, in this order (OpenAI's and llama.cpp's definitions):

1. logit_bias is added to the logits (-100 bans a character), and the penalties are
   taken off: frequency_penalty x how often a character was drawn so far in this sample,
   presence_penalty once for any character drawn at least once (the prime not counted);
2. temperature divides them: low values (0.5) make the text safer and more repetitive,
   high values (1.2) wilder; 0 means greedy (the argmax of step 1's logits);
3. top-k keeps the k likeliest characters; then the softmax;
4. min-p drops characters less likely than min_p x the likeliest one;
5. top-p keeps the smallest set whose probability reaches p; one uniform draws from what
   is left.

All randomness comes from one seeded `torch.Generator`: same seed, same text.
`prior` (charrnn.model.startmix) is mixed into the predictions made while fewer than
POSITIONS characters have been read from the start state, as `evaluate` scores them.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from charrnn.data.text import Vocab
from charrnn.errors import UsageError, check_text
from charrnn.infer.decode import make_decoder
from charrnn.model.network import CharRNN, evaluating
from charrnn.model.startmix import POSITIONS, StartMix


@dataclass(frozen=True)
class SampleSettings:
    length: int = 500  # new characters per sample
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop: str = ""  # end a sample once it has generated this string ("" = never)
    min_p: float = 0.0  # 0 = off; else drop characters less likely than min_p x the likeliest
    frequency_penalty: float = 0.0  # -2 to 2: logit - this x times drawn so far
    presence_penalty: float = 0.0  # -2 to 2: logit - this, for a character drawn at least once
    logit_bias: tuple[tuple[int, float], ...] = ()  # (id, -100 to 100) added to the logit

    def validate(self) -> None:
        if self.length < 0:
            raise UsageError(f"--length must be >= 0, not {self.length}")
        check_temperature(self.temperature)
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0 (0 = off), not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], not {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise UsageError(f"--min-p must be in [0, 1] (0 = off), not {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise UsageError(f"--{name.replace('_', '-')} must be from -2 to 2 (0 = off), not {value}")
        for _, bias in self.logit_bias:
            if not -100 <= bias <= 100:
                raise UsageError(f"--logit-bias values must be from -100 to 100, not {bias}")
        check_text(self.stop, "stop")

    @property
    def shaped(self) -> bool:
        return shapes(self)


def shapes(controls) -> bool:
    """Whether step 1 (bias, penalties) changes any logit, for a SampleSettings or an
    engine.Request (both carry logit_bias, frequency_penalty and presence_penalty)."""
    return bool(controls.logit_bias) or controls.frequency_penalty != 0 or controls.presence_penalty != 0


def bias_row(logit_bias: tuple[tuple[int, float], ...], size: int) -> torch.Tensor:
    """logit_bias's (id, bias) pairs as a (1, size) float32 row."""
    row = torch.zeros(1, size)
    for i, value in logit_bias:
        row[0, i] += value
    return row


def parse_logit_bias(vocab: Vocab, given: dict[str, float] | str, name: str = "--logit-bias") -> tuple:
    """logit_bias keys to ids: a one-character key is that character, a longer key of digits
    an id (OpenAI's clients send ids as strings). Given as a dict (the API, JSON) or as the
    flag's CHAR=VALUE,... ("\\n" a newline, "," and "=" quoted with a backslash)."""
    if isinstance(given, str):
        given = _bias_pairs(given, name)
    out = []
    for key, value in given.items():
        if len(key) == 1:
            if key not in vocab.chars:
                raise UsageError(f"{name}: {key!r} is not a character the model knows")
            out.append((vocab.chars.index(key), float(value)))
        elif key.isdigit() and key.isascii():
            if int(key) >= len(vocab):
                raise UsageError(f"{name}: id {key} is past the model's {len(vocab)} characters")
            out.append((int(key), float(value)))
        else:
            raise UsageError(f"{name}: {key!r} is neither one character nor a character id")
        if not -100 <= out[-1][1] <= 100:
            raise UsageError(f"{name}: the value for {key!r} must be from -100 to 100, not {value}")
    return tuple(out)


def _bias_pairs(text: str, name: str) -> dict[str, float]:
    pairs: dict[str, float] = {}
    for item in re.split(r"(?<!\\),", text):
        parts = re.split(r"(?<!\\)=", item)
        if len(parts) != 2 or not parts[0]:
            raise UsageError(f"{name} takes CHAR=VALUE pairs separated by commas (\\, \\= \\n for those), not {item!r}")
        key = re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), parts[0])
        try:
            pairs[key] = float(parts[1])
        except ValueError:
            raise UsageError(f"{name}: the value for {key!r} must be a number, not {parts[1]!r}") from None
    return pairs


def check_temperature(temperature: float) -> None:
    if not 0 <= temperature < float("inf"):
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), not {temperature}")


def sample_text(model: CharRNN, vocab: Vocab, settings: SampleSettings, generator: torch.Generator,
                device: torch.device | str = "cpu", prior: StartMix | None = None) -> str:
    """One sample from the start state (no prime), as a string: what training shows at each
    validation and `charrnn viz` colours."""
    empty = torch.zeros(0, dtype=torch.long)
    return "".join(chars[0] for chars in generate(model, vocab, empty, settings, generator=generator, device=device,
                                                  prior=prior))


def check_num_samples(num_samples: int) -> None:
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise UsageError(f"--num-samples must be from 1 to {MAX_SAMPLES}, not {num_samples}")


MAX_SAMPLES = 1 << 16  # streams decoded together: memory grows with it


def next_ids(logits: torch.Tensor, settings: SampleSettings, generator: torch.Generator | None,
             counts: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one id per row of (N, V) logits under the settings -> (N,) int64. counts: (N, V)
    how often each character was drawn so far in each row's sample (for the penalties)."""
    rows = logits.shape[0]
    if settings.shaped:
        logits = shape_logits(logits, bias_row(settings.logit_bias, logits.shape[-1]).to(logits.device), counts,
                              _column(rows, settings.frequency_penalty, logits), _column(rows, settings.presence_penalty, logits))
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.min_p > 0:
        probs = min_p_filter(probs, _column(rows, settings.min_p, logits))
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a character when the likelier ones already reach top_p (the first always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= settings.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # Inverse-CDF draw: one uniform per row (7x cheaper than torch.multinomial for 64 rows).
    cdf = probs.cumsum(dim=-1)  # (N, V)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=cdf.dtype)
    return (cdf < u * cdf[:, -1:]).sum(dim=-1).clamp_(max=probs.shape[-1] - 1)


def _column(rows: int, value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((rows, 1), float(value), device=like.device)


def shape_logits(logits: torch.Tensor, bias: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor,
                 presence: torch.Tensor) -> torch.Tensor:
    """Step 1: (N, V) logits as float32 + bias (1 or N, V) - counts (N, V) x frequency (N, 1)
    - [counts > 0] x presence (N, 1). A row whose controls are all 0 keeps its values."""
    return logits.float() + bias - counts * frequency - (counts > 0).float() * presence


def min_p_filter(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Step 4: probabilities below min_p (N, 1) x the row's largest set to 0 (0: none)."""
    return probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)


def count_drawn(counts: torch.Tensor, ids: torch.Tensor) -> None:
    """Add one to each row's count of the id it drew."""
    counts.scatter_add_(1, ids[:, None], torch.ones(len(ids), 1, device=counts.device))


def next_ids_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  uniforms: torch.Tensor, greedy: bool = True, nucleus: bool = True,
                  top_k: torch.Tensor | None = None, min_p: torch.Tensor | None = None,
                  shaping: tuple | None = None) -> torch.Tensor:
    """next_ids with settings per row, for rows of different requests decoded together:
    (N, V) logits, (N, 1) temperature (0 = greedy), top_p (1 = off) and uniforms (each
    row's own draw) -> (N,) int64; top_k (N, 1) int64 (0 = off), min_p (N, 1) (0 = off) and
    shaping, shape_logits' (bias, counts, frequency, presence), None where no row uses them.
    A row gets the id next_ids would give it alone, bit for bit (tests/test_sample.py):
    the same operations, each one row-wise, and a control at its "off" value leaves a row's
    values as they were.
    greedy / nucleus False: the caller knows no row is greedy / filters by top_p, and the
    work for them is skipped (half the operations: ~0.13 ms of a step at 64 rows, 2x384)."""
    if shaping is not None:
        logits = shape_logits(logits, *shaping)
    greedy_rows = temperature == 0 if greedy else None
    divisor = torch.where(greedy_rows, torch.ones_like(temperature), temperature) if greedy else temperature
    scaled = logits.float() / divisor
    if top_k is not None:
        size = scaled.shape[-1]
        on = (top_k > 0) & (top_k < size)  # (N, 1)
        kth = scaled.sort(dim=-1, descending=True).values.gather(1, (top_k.clamp(1, size) - 1))
        scaled = scaled.masked_fill(on & (scaled < kth), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if min_p is not None:
        probs = min_p_filter(probs, min_p)
    if nucleus and bool((top_p < 1).any()):
        limit = torch.where(top_p < 1, top_p, torch.full_like(top_p, float("inf")))  # inf: no filter at all
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= limit
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    cdf = probs.cumsum(dim=-1)
    ids = (cdf < uniforms.to(cdf.dtype) * cdf[:, -1:]).sum(dim=-1).clamp_(max=probs.shape[-1] - 1)
    return torch.where(greedy_rows[:, 0], logits.argmax(dim=-1), ids) if greedy else ids


def start_ids(vocab: Vocab, prime_ids: torch.Tensor) -> torch.Tensor:
    """The characters that warm the state: the prime, or a newline when there is none."""
    if len(prime_ids):
        return prime_ids.long()
    start = "\n" if "\n" in vocab else vocab.chars[0]
    return torch.tensor([vocab.chars.index(start)])


@torch.no_grad()
def generate(
    model: CharRNN,
    vocab: Vocab,
    prime_ids: torch.Tensor,
    settings: SampleSettings,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    fast: bool = True,
    dtype: torch.dtype | None = None,
    prior: StartMix | None = None,
) -> Iterator[list[str]]:
    """Yield, step by step, the next character of each of num_samples samples.

    A sample that has produced settings.stop yields "" from then on; generation ends
    when every sample is done or has settings.length characters. fast=True uses a
    packed-weight decoder (charrnn.infer.decode, every cell) for the steps after the prime;
    fast=False calls model.forward for every character (the reference path). dtype is
    the decoder's matmul precision (None = fp32; see charrnn.infer.decode.matmul_dtype).
    """
    settings.validate()
    check_num_samples(num_samples)
    with _threads_for(num_samples, device), evaluating(model):
        yield from _generate(model, vocab, prime_ids, settings, num_samples, generator, device, fast, dtype, prior)


@contextmanager
def _threads_for(num_samples: int, device) -> Iterator[None]:
    """One thread for a single stream on a CPU: its matrix-vector products ran 12% faster
    than with two threads (148 vs 168 us a step at 2x512), which only add sync costs."""
    if torch.device(device).type != "cpu" or num_samples > 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def read_prime(model: CharRNN, vocab: Vocab, prime_ids: torch.Tensor, num_samples: int, device,
               prior: StartMix | None) -> tuple[torch.Tensor, tuple, torch.Tensor]:
    """Read the prime (or the newline start) for num_samples streams in one forward pass:
    the logits of the first new character (N, V), the state after the prime, and the ids
    read from the start state so far (N, T), which the prior needs for its next mixes."""
    warm = start_ids(vocab, prime_ids).to(device)
    read_ids = warm[None].expand(num_samples, -1)
    logits, state = model(read_ids)
    logits = logits[:, -1]  # (N, V)
    if prior is not None:
        logits = prior.mix_at(logits, read_ids)
    return logits, state, read_ids


def mix_next(prior: StartMix | None, logits: torch.Tensor, read_ids: torch.Tensor,
             ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """After a step that read ids (N,): the logits with the prior mixed in while fewer than
    POSITIONS characters have been read, and the read ids grown to match."""
    if prior is None or read_ids.shape[1] >= POSITIONS:
        return logits, read_ids
    read_ids = torch.cat([read_ids, ids[:, None]], 1)
    return prior.mix_at(logits, read_ids), read_ids


def _generate(model, vocab, prime_ids, settings, num_samples, generator, device, fast, dtype, prior):
    logits, state, read_ids = read_prime(model, vocab, prime_ids, num_samples, device, prior)
    decoder = None
    if fast:
        decoder = make_decoder(model, num_samples, device, dtype=dtype)
        decoder.load_state(state)
    tails = [""] * num_samples
    done = [False] * num_samples
    alphabet = vocab.chars
    counts = torch.zeros(num_samples, len(alphabet), device=logits.device) if settings.shaped else None
    for _ in range(settings.length):
        ids = next_ids(logits, settings, generator, counts)  # (N,)
        if counts is not None:
            count_drawn(counts, ids)
        chars = [alphabet[i] for i in ids.tolist()]
        if settings.stop:
            chars = [_stop_check(n, char, tails, done, settings.stop) for n, char in enumerate(chars)]
            yield chars
            if all(done):
                return
        else:
            yield chars
        if decoder is not None:
            logits = decoder.step(ids)
        else:
            logits, state = model(ids[:, None], state)
            logits = logits[:, -1]
        logits, read_ids = mix_next(prior, logits, read_ids, ids)


def _stop_check(n: int, char: str, tails: list[str], done: list[bool], stop: str) -> str:
    """char if sample n is still going (and note whether it just wrote stop), else ""."""
    if done[n]:
        return ""
    tails[n] = (tails[n] + char)[-len(stop) :]
    done[n] = tails[n] == stop
    return char

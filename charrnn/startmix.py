"""The start mix: a k-gram model of the training text, mixed into the first predictions
of every read from the start state.

From the start state the network knows nothing of where in the text it is, and for the
first few characters after a short prime it can only guess from those characters. A
Witten-Bell k-gram model of the training split (the counts of its 1- to 6-grams) guesses
from the same characters about as well, from other knowledge (the exact n-grams of the
text, which a 2-million-weight network does not hold), and their mixture guesses better
than either. Measured on the default 10-minute Tiny Shakespeare model (run E in
docs/benchmarks.md, the cold-start section) over 4,096 places of the validation split:
the first 10 predictions read from the start state went from 1.704 to 1.654 nats, and
the cold-start gap (beside the same predictions after 200 characters) from 0.281 to
0.231. It costs ~5 MB of checkpoint and 0.1 s a validation.

Only a fresh read mixes (a forward call with no state given, in eval mode) and only its
first POSITIONS predictions; `sample` mixes the characters it writes there too. Carried
state (the rest of a text, training, dynamic evaluation's later segments) is the
network alone. The k-gram's weight at each of those predictions is fit at every
validation on windows of the validation split, so it falls as the network gets
better at reading; a weight of 0 is the network alone.

Left alone: mixed into every prediction, the k-gram would also lower the loss read with
context (1.423 -> 1.398 nats at the same places, weights 0.15-0.35), and the gap,
measured that way, would be 0.256 (scripts/coldstart.py --warm-mix). But then `eval`
would no longer score the network that people compare with published LSTM figures and
with the plain loop, so only the start, where the network has no context to read, is
mixed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from charrnn.device import autocast

POSITIONS = 10  # the first predictions of a fresh read that are mixed
ORDER = 6  # n-grams of up to 6 characters: contexts of up to 5 (7 and up gained < 0.002)
MAX_GRAMS = 1_000_000  # table entries kept (~12 MB); a bigger table keeps fewer orders
FIT_WINDOWS = 512  # validation windows the weights are fit on
GRID = 21  # weights tried at each position: 0, 0.05, ..., 1


def max_order(vocab_size: int) -> int:
    """The longest n-gram whose key (base vocab_size) fits in an int64 with room to spare."""
    return ORDER if vocab_size < 2 else max(1, int(62 / math.log2(vocab_size)))


def _keys(ids: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """The key of every n-gram of ids (1-D, long): its characters as digits in base vocab_size."""
    keys = torch.zeros(len(ids) - n + 1, dtype=torch.long)
    for i in range(n):
        keys = keys * vocab_size + ids[i : len(ids) - n + 1 + i]
    return keys


def _lookup(sorted_keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """values[i] where sorted_keys[i] == query, else 0."""
    if len(sorted_keys) == 0:
        return torch.zeros(query.shape, dtype=values.dtype)
    at = torch.searchsorted(sorted_keys, query).clamp(max=len(sorted_keys) - 1)
    return torch.where(sorted_keys[at] == query, values[at], torch.zeros((), dtype=values.dtype))


class StartMix:
    """The k-gram tables (sorted n-gram keys and counts, n = 1..order) and the weights."""

    def __init__(self, vocab_size: int, keys: list[torch.Tensor], counts: list[torch.Tensor],
                 weights: torch.Tensor | None = None):
        self.vocab_size = vocab_size
        self.keys = keys
        self.counts = counts
        self.weights = torch.zeros(POSITIONS) if weights is None else weights.float()
        self.order = len(keys)
        self._unigram = torch.zeros(vocab_size, dtype=torch.float64)
        if self.order:
            self._unigram[keys[0]] = counts[0].double()
        self._total = self._unigram.sum()
        # For contexts of length m = 1..order-1: their keys, how many times something
        # follows them, and how many different characters do (Witten-Bell's t and k).
        self._contexts = []
        for n in range(2, self.order + 1):
            context, which = torch.unique_consecutive(keys[n - 1] // vocab_size, return_inverse=True)
            totals = torch.zeros(len(context), dtype=torch.float64).index_add_(0, which, counts[n - 1].double())
            kinds = torch.bincount(which, minlength=len(context)).double()
            self._contexts.append((context, totals, kinds))

    @classmethod
    def build(cls, ids: torch.Tensor, vocab_size: int, order: int = ORDER, max_grams: int = MAX_GRAMS) -> "StartMix":
        """Count the n-grams of ids (the training split), as many orders as fit max_grams."""
        ids = ids.detach().long().cpu()
        order = min(order, max_order(vocab_size), len(ids))
        keys, counts, kept = [], [], 0
        for n in range(1, order + 1):
            key, count = torch.unique(_keys(ids, n, vocab_size), sorted=True, return_counts=True)
            if n > 1 and kept + len(key) > max_grams:
                break
            keys.append(key)
            counts.append(count.int())
            kept += len(key)
        return cls(vocab_size, keys, counts)

    # -- storage (a checkpoint field) --------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "counts": list(self.counts), "weights": self.weights.clone()}

    @classmethod
    def from_state(cls, state: dict[str, Any], vocab_size: int) -> "StartMix":
        return cls(vocab_size, list(state["keys"]), list(state["counts"]), state["weights"])

    @staticmethod
    def problem(state: Any, vocab_size: int) -> str | None:
        """What is wrong with a stored start mix, or None."""
        if not isinstance(state, dict) or not {"keys", "counts", "weights"} <= state.keys():
            return "start_mix is not a dict of keys, counts and weights"
        keys, counts, weights = state["keys"], state["counts"], state["weights"]
        if not isinstance(keys, list) or not isinstance(counts, list) or len(keys) != len(counts):
            return "start_mix keys and counts are not lists of the same length"
        for n, (key, count) in enumerate(zip(keys, counts), 1):
            if not (isinstance(key, torch.Tensor) and isinstance(count, torch.Tensor)) or key.shape != count.shape \
                    or key.dim() != 1 or key.dtype != torch.long:
                return f"start_mix's {n}-gram table is malformed"
            if len(key) and (key.min() < 0 or key.max() >= vocab_size ** n or bool((key[1:] <= key[:-1]).any())):
                return f"start_mix's {n}-gram keys are out of range or not sorted"
        if not isinstance(weights, torch.Tensor) or weights.shape != (POSITIONS,) \
                or not bool(((weights >= 0) & (weights <= 1)).all()):
            return f"start_mix weights are not {POSITIONS} values in [0, 1]"
        return None

    def summary(self) -> dict[str, int]:
        return {"order": self.order, "grams": sum(len(k) for k in self.keys), "positions": POSITIONS}

    # -- reading -----------------------------------------------------------------------------

    def log_probs(self, history: torch.Tensor) -> torch.Tensor:
        """(B, V) log-probabilities of the next character after each row of history (B, m),
        m >= 1: Witten-Bell interpolation from the longest context the tables hold down to
        an add-one unigram, so an unseen context still gets a probability."""
        history = history.detach().long().cpu()
        v = self.vocab_size
        p = ((self._unigram + 1) / (self._total + v)).expand(len(history), v)
        every = torch.arange(v)
        context = torch.zeros(len(history), dtype=torch.long)
        for m in range(1, min(history.shape[1], self.order - 1) + 1):
            # the last m characters, most recent last: key = older digits first
            context = context + history[:, -m] * v ** (m - 1)
            keys, totals, kinds = self._contexts[m - 1]
            t = _lookup(keys, totals, context)[:, None]
            k = _lookup(keys, kinds, context)[:, None]
            seen = _lookup(self.keys[m], self.counts[m], context[:, None] * v + every).double()
            p = torch.where(t > 0, (seen + k * p) / (t + k).clamp(min=1), p)
        return p.log().float()

    def mixes(self, m: int) -> bool:
        """Whether the prediction after m characters read from the start state is mixed."""
        return 1 <= m <= POSITIONS and self.order > 0 and bool(self.weights[m - 1] > 0)

    def mix_at(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """The network's (N, V) logits for the prediction after history (N, m), m characters
        read from the start state, mixed with the k-gram's: log-probabilities (valid logits)."""
        m = history.shape[1]
        if not self.mixes(m):
            return logits
        w = float(self.weights[m - 1])
        kgram = self.log_probs(history).to(logits.device) + math.log(w)
        net = logits.float().log_softmax(-1) + (math.log(1 - w) if w < 1 else -math.inf)
        return torch.logaddexp(net, kgram)

    def mix(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A fresh read's logits (B, T, V) for inputs x (B, T), its first POSITIONS mixed."""
        first = min(x.shape[1], POSITIONS)
        if not any(self.mixes(t + 1) for t in range(first)):
            return logits
        mixed = [self.mix_at(logits[:, t], x[:, : t + 1]).float() for t in range(first)]
        return torch.cat([torch.stack(mixed, 1), logits[:, first:].float()], 1)

    @torch.no_grad()
    def fit(self, model, ids: torch.Tensor, dtype=None, windows: int = FIT_WINDOWS, seed: int = 0) -> None:
        """Choose each position's weight to minimise the mixed loss of `windows` fresh reads
        at random places of ids (the validation split): the network's logits from its start
        state, the k-gram's from the same characters."""
        if len(ids) < POSITIONS + 2 or self.order == 0:
            return
        places = torch.randint(0, len(ids) - POSITIONS - 1, (windows,), generator=torch.Generator().manual_seed(seed))
        span = ids.cpu()[places[:, None] + torch.arange(POSITIONS + 1)].long()
        x, y = span[:, :-1], span[:, 1:]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with autocast(device, dtype):
            logits, _ = model(x.to(device), model.init_state(windows, device))  # given a state: the network alone
        model.train(was_training)
        net = logits.float().log_softmax(-1).cpu().gather(-1, y[..., None])[..., 0].double()  # (W, P)
        grid = torch.linspace(0, 1, GRID, dtype=torch.float64)
        for t in range(POSITIONS):
            kgram = self.log_probs(x[:, : t + 1]).gather(-1, y[:, t : t + 1])[:, 0].double()  # (W,)
            mixed = torch.logaddexp(net[:, t, None] + (1 - grid).log(), kgram[:, None] + grid.log())  # (W, G)
            self.weights[t] = float(grid[(-mixed.mean(0)).argmin()])

"""The start mix: a prior over the first predictions read from the start state, a k-gram
model of the training text mixed into them.

From the start state the network knows nothing of where in the text it is, and for the
first few characters after a short prime it can only guess from those characters. A
Witten-Bell k-gram model of the training split (the counts of its 1- to 6-grams) guesses
from the same characters about as well, from other knowledge (the exact n-grams of the
text), and their mixture guesses better than either (docs/benchmarks.md, "Why the start
mix").

It is a decoding and scoring concern, not part of the network: `CharRNN.forward` gives
the network's logits whatever called it, and the callers that read from the start state
take the prior and mix it in: `evaluate(..., prior=)`, `generate(..., prior=)`,
`analysis.trace(..., prior=)` (charrnn viz), and through them `charrnn.load(...)`'s
sample and score. Only the first POSITIONS predictions of a read from the start state
are mixed; carried state (the rest of a text, training) is the network alone. The
k-gram's weight at each of those predictions is fit at every validation on windows of
the validation split, so it falls as the network gets better at reading; a weight of 0
is the network alone.

Stored compactly (`state`): the n-gram tables as a trie, each n-gram its last character
and its count, each (n-1)-gram how many n-grams extend it, in the smallest integer types
that hold them: ~3-4 bytes an n-gram, against 12 for the int64 keys and int32 counts the
lookups use in memory (rebuilt at load).

Left alone: mixed into every prediction, the k-gram would also lower the loss read with
context (scripts/coldstart.py --warm-mix shows by how much), but then `eval` would no
longer score the network that people compare with published LSTM figures and with the
plain loop, so only the start, where the network has no context to read, is mixed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from charrnn.device import autocast
from charrnn.model.network import evaluating

POSITIONS = 10  # the first predictions of a fresh read that are mixed
ORDER = 6  # n-grams of up to 6 characters: contexts of up to 5 (7 and up gained < 0.002)
MAX_GRAMS = 1_000_000  # table entries kept (~12 MB in memory, ~4 MB stored); a bigger table keeps fewer orders
FIT_WINDOWS = 512  # validation windows the weights are fit on
GRID = 21  # weights tried at each position: 0, 0.05, ..., 1
# A longer training split is counted on SAMPLE_BLOCKS blocks spread over it, SAMPLE_CHARS in
# all (~1.5 s and ~250 MB at most; the tables of a smaller text are those of all of it).
SAMPLE_CHARS, SAMPLE_BLOCKS = 1 << 22, 64


def max_order(vocab_size: int) -> int:
    """The longest n-gram whose key (base vocab_size) fits in an int64 with room to spare."""
    return ORDER if vocab_size < 2 else max(1, int(62 / math.log2(vocab_size)))


def _keys(ids: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """The key of every n-gram of ids (1-D, long): its characters as digits in base vocab_size."""
    keys = torch.zeros(len(ids) - n + 1, dtype=torch.long)
    for i in range(n):
        keys = keys * vocab_size + ids[i : len(ids) - n + 1 + i]
    return keys


def _smallest(values: torch.Tensor) -> torch.Tensor:
    """values (non-negative integers) in the smallest type that holds them: uint8, int16 or int32."""
    top = int(values.max()) if len(values) else 0
    kind = torch.uint8 if top < 1 << 8 else torch.int16 if top < 1 << 15 else torch.int32
    return values.to(kind)


def _keys_problem(state: dict[str, Any], vocab_size: int) -> str | None:
    """What is wrong with a start mix stored in its first form (int64 keys), or None."""
    keys, counts = state["keys"], state.get("counts")
    if not isinstance(keys, list) or not isinstance(counts, list) or len(keys) != len(counts):
        return "start_mix keys and counts are not lists of the same length"
    for n, (key, count) in enumerate(zip(keys, counts), 1):
        if not (isinstance(key, torch.Tensor) and isinstance(count, torch.Tensor)) or key.shape != count.shape \
                or key.dim() != 1 or key.dtype != torch.long:
            return f"start_mix's {n}-gram table is malformed"
        if len(key) and (key.min() < 0 or key.max() >= vocab_size ** n or bool((key[1:] <= key[:-1]).any())):
            return f"start_mix's {n}-gram keys are out of range or not sorted"
    return None


def _lookup(sorted_keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """values[i] where sorted_keys[i] == query, else 0."""
    if len(sorted_keys) == 0:
        return torch.zeros(query.shape, dtype=values.dtype)
    at = torch.searchsorted(sorted_keys, query).clamp(max=len(sorted_keys) - 1)
    return torch.where(sorted_keys[at] == query, values[at], torch.zeros((), dtype=values.dtype))


def _sample(ids: torch.Tensor) -> list[torch.Tensor]:
    """What the tables are counted on: all of ids (long, on the CPU) when it has at most
    SAMPLE_CHARS characters, else SAMPLE_BLOCKS blocks spread evenly over it, so a corpus of
    any size is counted in bounded time and memory (n-grams within each block)."""
    if len(ids) <= SAMPLE_CHARS:
        return [ids.detach().long().cpu()]
    length = SAMPLE_CHARS // SAMPLE_BLOCKS
    stride = (len(ids) - length) // (SAMPLE_BLOCKS - 1)
    return [ids[i * stride : i * stride + length].long().cpu() for i in range(SAMPLE_BLOCKS)]


def _counted(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct keys of parts, sorted, and how often each occurs: counted part by part,
    then merged, so no sort ever holds more than the distinct keys of all the parts."""
    if len(parts) == 1:
        return torch.unique(parts[0], sorted=True, return_counts=True)
    counted = [torch.unique(part, sorted=True, return_counts=True) for part in parts]
    keys, which = torch.unique(torch.cat([k for k, _ in counted]), sorted=True, return_inverse=True)
    counts = torch.zeros(len(keys), dtype=torch.long).index_add_(0, which, torch.cat([c for _, c in counted]))
    return keys, counts


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
        parts = _sample(ids)
        order = min(order, max_order(vocab_size), min(len(part) for part in parts))
        keys, counts, kept = [], [], 0
        for n in range(1, order + 1):
            key, count = _counted([_keys(part, n, vocab_size) for part in parts])
            if n > 1 and kept + len(key) > max_grams:
                break
            keys.append(key)
            counts.append(count.int())
            kept += len(key)
        return cls(vocab_size, keys, counts)

    # -- storage (a checkpoint field) --------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The stored form: the tables as a trie in the smallest integer types (module docstring).

        chars[n-1]    the last character of each n-gram, in the order of the sorted keys
        counts[n-1]   how many times each n-gram occurs
        children[n-1] how many (n+1)-grams extend each n-gram (n < order)
        """
        chars = [_smallest(key % self.vocab_size) for key in self.keys]
        children = [_smallest(torch.bincount(self._prefix_index(n), minlength=len(self.keys[n - 1])))
                    for n in range(1, self.order)]
        return {"chars": chars, "counts": [_smallest(c) for c in self.counts], "children": children,
                "weights": self.weights.clone()}

    def _prefix_index(self, n: int) -> torch.Tensor:
        """For each (n+1)-gram, the index of the n-gram it extends (its first n characters)."""
        return torch.searchsorted(self.keys[n - 1], self.keys[n] // self.vocab_size)

    @classmethod
    def from_state(cls, state: dict[str, Any], vocab_size: int) -> "StartMix":
        if "keys" in state:  # the first stored form: int64 keys and int32 counts as in memory
            return cls(vocab_size, list(state["keys"]), list(state["counts"]), state["weights"])
        keys = []
        for n, chars in enumerate(state["chars"], 1):
            prefix = keys[-1].repeat_interleave(state["children"][n - 2].long()) if n > 1 else 0
            keys.append(prefix * vocab_size + chars.long())
        return cls(vocab_size, keys, [c.int() for c in state["counts"]], state["weights"])

    @staticmethod
    def problem(state: Any, vocab_size: int) -> str | None:
        """What is wrong with a stored start mix, or None."""
        if not isinstance(state, dict) or "weights" not in state:
            return "start_mix is not a dict of tables and weights"
        weights = state["weights"]
        if not isinstance(weights, torch.Tensor) or weights.shape != (POSITIONS,) \
                or not bool(((weights >= 0) & (weights <= 1)).all()):
            return f"start_mix weights are not {POSITIONS} values in [0, 1]"
        if "keys" in state:
            return _keys_problem(state, vocab_size)
        chars, counts, children = state.get("chars"), state.get("counts"), state.get("children")
        if not all(isinstance(t, list) and all(isinstance(x, torch.Tensor) and x.dim() == 1 for x in t)
                   for t in (chars, counts, children)) or len(chars) != len(counts) \
                or len(children) != max(0, len(chars) - 1):
            return "start_mix's tables are not lists of 1-D tensors of matching lengths"
        for n, (char, count) in enumerate(zip(chars, counts), 1):
            expected = len(chars[0]) if n == 1 else int(children[n - 2].long().sum())
            if len(char) != len(count) or len(char) != expected or (n > 1 and len(children[n - 2]) != len(chars[n - 2])):
                return f"start_mix's {n}-gram table does not fit the one before it"
            if len(char) and (char.min() < 0 or char.max() >= vocab_size or count.min() < 1):
                return f"start_mix's {n}-gram table holds characters or counts out of range"
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
        if hasattr(ids, "windows"):  # a charrnn.data.prepared.IdReader: read, not mapped
            span = ids.windows(places, POSITIONS + 1).long()
        else:
            span = ids[(places[:, None] + torch.arange(POSITIONS + 1)).to(ids.device)].cpu().long()  # (W, P + 1)
        x, y = span[:, :-1], span[:, 1:]
        device = next(model.parameters()).device
        with evaluating(model), autocast(device, dtype):
            logits, _ = model(x.to(device))
        net = logits.float().log_softmax(-1).cpu().gather(-1, y[..., None])[..., 0].double()  # (W, P)
        grid = torch.linspace(0, 1, GRID, dtype=torch.float64)
        for t in range(POSITIONS):
            kgram = self.log_probs(x[:, : t + 1]).gather(-1, y[:, t : t + 1])[:, 0].double()  # (W,)
            mixed = torch.logaddexp(net[:, t, None] + (1 - grid).log(), kgram[:, None] + grid.log())  # (W, G)
            self.weights[t] = float(grid[(-mixed.mean(0)).argmin()])

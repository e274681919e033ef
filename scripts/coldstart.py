#!/usr/bin/env python3
"""How well a model reads from its start state: the cold-start gap.

    python scripts/coldstart.py runs/tinyshakespeare [--text FILE] [--prime "ROMEO:"]

For a few hundred random places in the validation text (the last --val-frac of --text,
by default the run's own corpus) prints the mean loss of each of the first 10
predictions read from the start state (as `charrnn sample --prime` and `charrnn eval`
begin), beside the same predictions read after 200 characters of the text before
them, and the gap; then the model's five likeliest characters after the prime.

The "k-gram floor" row is what no model reading from the start state can do much better
than at the first positions: at position p the loss of the best p-character context
model, the counts of (p+1)-grams over the whole text (in-sample, so if anything below the
truth), at the same places. Where the start state's row meets it, the gap left is
information the short context lacks, not something training can close. The "k-gram
train" row is an honest, reachable version of it: the same k-gram model counted on the
training split only (Witten-Bell interpolated, so unseen contexts still score), read at
the same validation places. A model whose start state reads about as well has learned
what those few characters can tell.
"""

from __future__ import annotations

import argparse
import math
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from collections import Counter  # noqa: E402

from charrnn import checkpoint  # noqa: E402
from charrnn.data import read_corpus, split  # noqa: E402
from charrnn.evaluate import cold_start, cold_start_places  # noqa: E402

POSITIONS = 10  # predictions read from the start state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .pt file or a run directory")
    parser.add_argument("--text", help="text whose last --val-frac is read (default: the run's corpus)")
    parser.add_argument("--val-frac", type=float, default=0.1)
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--prime", default="ROMEO:")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--floor-positions", type=int, default=4, help="positions given k-gram rows (0: none)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    payload = checkpoint.load(args.checkpoint)
    model, vocab = checkpoint.restore_model(payload)
    sources = [args.text] if args.text else payload.corpus["sources"]
    text = read_corpus([s for s in sources if not s.startswith("<embedded")] or []).data.decode("utf-8")
    ids, _ = vocab.encode(text, "skip")
    train, val = split(ids, args.val_frac)
    cold, warm = cold_start(model, val, args.windows, args.context, POSITIONS, torch.Generator().manual_seed(args.seed))
    gaps = [c - w for c, w in zip(cold, warm)]
    # the places cold_start read from (the same generator, the same draw)
    places = cold_start_places(len(val), args.windows, args.context, POSITIONS,
                               torch.Generator().manual_seed(args.seed)).tolist()
    floor = kgram_floor(ids, val, places, args.floor_positions)
    trained = kgram_trained(train, val, len(vocab), places, args.floor_positions)
    prime_ids, _ = vocab.encode(args.prime, "skip")
    with torch.no_grad():
        logits, _ = model(prime_ids.long()[None])
    probs = torch.softmax(logits[0, -1].float(), -1)
    top = [(vocab.chars[i], round(probs[i].item(), 3)) for i in probs.topk(5).indices.tolist()]
    if args.json:
        print(json.dumps({"cold": cold, "warm": warm, "mean_gap": sum(gaps) / len(gaps), "kgram_floor": floor,
                          "kgram_trained": trained, "after_prime": top}))
        return
    print("position     " + " ".join(f"{i:>5d}" for i in range(1, 11)) + "   mean")
    for name, row in (("start state", cold), (f"{args.context} context", warm), ("gap", gaps)):
        print(f"{name:12s} " + " ".join(f"{v:5.2f}" for v in row) + f"   {sum(row) / len(row):.3f}")
    if floor:
        print(f"{'k-gram floor':12s} " + " ".join(f"{v:5.2f}" for v in floor))
        print(f"{'k-gram train':12s} " + " ".join(f"{v:5.2f}" for v in trained))
    print(f"after {args.prime!r}: " + ", ".join(f"{c!r} {p:.2f}" for c, p in top))


def kgram_floor(ids: torch.Tensor, val: torch.Tensor, places: list[int], positions: int) -> list[float]:
    """Loss at positions 1..positions of the (p+1)-gram counts of the whole text, at the
    places (in val) where cold_start read."""
    if positions <= 0:
        return []
    text = ids.tolist()
    window = val.tolist()
    floor = []
    for p in range(1, positions + 1):
        grams = Counter(tuple(text[i : i + p + 1]) for i in range(len(text) - p))
        contexts = Counter(tuple(text[i : i + p]) for i in range(len(text) - p))
        losses = [-math.log(grams[tuple(window[s : s + p + 1])] / contexts[tuple(window[s : s + p])]) for s in places]
        floor.append(sum(losses) / len(losses))
    return floor


def kgram_trained(train: torch.Tensor, val: torch.Tensor, vocab_size: int, places: list[int],
                  positions: int) -> list[float]:
    """Loss at positions 1..positions of a (p+1)-gram model counted on the training split
    only and read out of sample, at the same places: what a k-gram model learns from
    the same text. Witten-Bell interpolation down to an add-one unigram, so contexts
    unseen in training still get a probability."""
    if positions <= 0:
        return []
    text = train.tolist()
    grams = [Counter(tuple(text[i : i + n]) for i in range(len(text) - n + 1)) for n in range(positions + 2)]
    totals = [Counter() for _ in range(positions + 1)]  # per context: how often something follows it
    kinds = [Counter() for _ in range(positions + 1)]  # and how many different characters
    for n in range(1, positions + 1):
        for gram, count in grams[n + 1].items():
            totals[n][gram[:-1]] += count
            kinds[n][gram[:-1]] += 1

    def probability(history: tuple, char: int) -> float:
        p = (grams[1][(char,)] + 1) / (len(text) + vocab_size)
        for n in range(1, len(history) + 1):
            h = history[-n:]
            if totals[n][h]:
                p = (grams[n + 1][h + (char,)] + kinds[n][h] * p) / (totals[n][h] + kinds[n][h])
        return p

    window = val.tolist()
    return [sum(-math.log(probability(tuple(window[s : s + p]), window[s + p])) for s in places) / len(places)
            for p in range(1, positions + 1)]


if __name__ == "__main__":
    main()

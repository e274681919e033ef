#!/usr/bin/env python3
"""How well a model reads from its start state: the cold-start gap.

    python scripts/coldstart.py runs/tinyshakespeare [--text FILE] [--prime "ROMEO:"]

For a few hundred random places in the validation text (the last --val-frac of --text,
by default the run's own corpus) prints the mean loss of each of the first 10
predictions read from the start state (as `charrnn sample --prime` and `charrnn eval`
begin), beside the same predictions read after 200 characters of the text before
them, and the gap; then the model's five likeliest characters after the prime.

A model trained with the start mix (charrnn.model.startmix, on by default) reads its first
predictions as `sample` and `eval` do, mixed with its k-gram; `--no-start-mix` reads with
the network alone, for the side-by-side. `--warm-mix` adds the row read with context
and mixed with the same k-gram too (a weight per position fit on other places): the gap
as it would be were the k-gram mixed into every prediction, not only the first.

The "k-gram floor" row is what no model reading from the start state can do much better
than at the first positions: at position p the loss of the best p-character context
model, the counts of (p+1)-grams over the whole text (in-sample, so if anything below the
truth), at the same places. Where the start state's row meets it, the gap left is
information the short context lacks, not something training can close. The "k-gram
train" row is an honest, reachable version of it: the same k-gram model counted on the
training split only (Witten-Bell interpolated, so unseen contexts still score), read at
the same validation places. A model whose start state reads about as well has learned
what those few characters can tell.

`--mixture K` adds a "mixture" row: the same predictions read by K + 1 states at once
(the states after --mixture-warmup characters at K random places of the training split,
and the start state, weighed --start-weight of the prior) and mixed by how well each
predicted the characters read so far, a Bayes posterior over where in the corpus a
short text could come from. It is what this model itself knows from the same few
characters without one start state standing in for every context: a row near the
start state's says that state already reads about as well as the model can. It costs
K + 1 reads of every window (4096: ~7 minutes on 2 cores).
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

import charrnn  # noqa: E402
from charrnn.data.text import read_corpus, rereadable, split  # noqa: E402
from charrnn.infer.evaluate import cold_start, cold_start_places, read  # noqa: E402
from charrnn.model.startmix import POSITIONS, StartMix  # noqa: E402


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
    parser.add_argument("--mixture", type=int, default=0, metavar="K", help="add the K-state mixture row (0: none)")
    parser.add_argument("--mixture-warmup", type=int, default=100, help="characters read before each mixture state")
    parser.add_argument("--start-weight", type=float, default=0.5, help="the start state's share of the prior")
    parser.add_argument("--no-start-mix", action="store_true", help="read with the network alone")
    parser.add_argument("--warm-mix", action="store_true",
                        help="add the row read with context and mixed with the start mix's k-gram too")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    loaded = charrnn.load(args.checkpoint, device="cpu")
    model, vocab = loaded.network, loaded.vocab
    prior = None if args.no_start_mix else loaded.prior
    weights = prior.weights.tolist() if prior is not None else []
    sources = [args.text] if args.text else rereadable(loaded.corpus["sources"])
    text = read_corpus(sources).data.decode("utf-8")
    ids, _ = vocab.encode(text, "skip")
    train, val = split(ids, args.val_frac)
    cold, warm = cold_start(model, val, args.windows, args.context, POSITIONS, torch.Generator().manual_seed(args.seed),
                            prior=prior)
    gaps = [c - w for c, w in zip(cold, warm)]
    # the places cold_start read from (the same generator, the same draw)
    places = cold_start_places(len(val), args.windows, args.context, POSITIONS,
                               torch.Generator().manual_seed(args.seed)).tolist()
    floor = kgram_floor(ids, val, places, args.floor_positions)
    trained = kgram_trained(train, val, len(vocab), places, args.floor_positions)
    mixed = mixture(model, train, val, places, POSITIONS, args.mixture, args.mixture_warmup, args.start_weight,
                    torch.Generator().manual_seed(args.seed + 1)) if args.mixture else []
    warm_mixed = warm_mix(model, loaded.prior, val, args.windows, args.context, args.seed) if args.warm_mix else []
    prime_ids, _ = vocab.encode(args.prime, "skip")
    with torch.no_grad():
        logits, _ = read(model, prime_ids.long()[None], None, prior)
    probs = torch.softmax(logits[0, -1].float(), -1)
    top = [(vocab.chars[i], round(probs[i].item(), 3)) for i in probs.topk(5).indices.tolist()]
    if args.json:
        print(json.dumps({"cold": cold, "warm": warm, "mean_gap": sum(gaps) / len(gaps), "kgram_floor": floor,
                          "kgram_trained": trained, "mixture": mixed, "after_prime": top, "warm_mixed": warm_mixed,
                          "start_mix_weights": weights}))
        return
    print("position     " + " ".join(f"{i:>5d}" for i in range(1, POSITIONS + 1)) + "   mean")
    rows = [("start state", cold), (f"{args.context} context", warm), ("gap", gaps)]
    if mixed:
        rows += [(f"mixture {args.mixture}", mixed), ("mixture gap", [m - w for m, w in zip(mixed, warm)])]
    if warm_mixed:
        rows += [("context+kgram", warm_mixed), ("gap, both", [c - w for c, w in zip(cold, warm_mixed)])]
    for name, row in rows:
        print(f"{name:12s} " + " ".join(f"{v:5.2f}" for v in row) + f"   {sum(row) / len(row):.3f}")
    if floor:
        print(f"{'k-gram floor':12s} " + " ".join(f"{v:5.2f}" for v in floor))
        print(f"{'k-gram train':12s} " + " ".join(f"{v:5.2f}" for v in trained))
    if weights:
        print("start mix weights " + " ".join(f"{w:.2f}" for w in weights))
    print(f"after {args.prime!r}: " + ", ".join(f"{c!r} {p:.2f}" for c, p in top))


@torch.no_grad()
def mixture(model, train: torch.Tensor, val: torch.Tensor, places: list[int], positions: int, count: int,
            warmup: int, start_weight: float, generator: torch.Generator, group: int = 8) -> list[float]:
    """Loss at positions 1..positions when count + 1 states read each window together:
    count states of the training text (each after `warmup` characters from a random
    place) and the start state, with prior weights (1 - start_weight) / count and
    start_weight. Each prediction is the mixture of theirs under the posterior weights
    (the prior times how well each state predicted every character read so far, the
    first one included: from its own output before it reads anything)."""
    model.eval()
    starts = torch.randint(0, len(train) - warmup - 1, (count,), generator=generator)
    _, bank = model(train[starts[:, None] + torch.arange(warmup)].long())
    bank = tuple(torch.cat([b, s], 1) for b, s in zip(bank, model.init_state(1)))  # (L, K + 1, H) each
    k = count + 1
    prior = torch.full((k,), math.log((1 - start_weight) / count))
    prior[-1] = math.log(start_weight)
    first = model.head(bank[0][-1]).float().log_softmax(-1)  # (K + 1, V): each state's guess at the first character
    span = val[torch.tensor(places)[:, None] + torch.arange(positions + 1)].long()  # (W, P + 1)
    read, target = span[:, :-1], span[:, 1:]
    scores = []  # (w, K + 1, P): log p of each target under each state
    for at in range(0, len(places), group):  # a few windows at a time: K + 1 reads of each
        x = read[at : at + group]
        n = len(x)
        state = tuple(b[:, None].expand(-1, n, -1, -1).reshape(b.shape[0], n * k, -1).contiguous() for b in bank)
        logits, _ = model(x.repeat_interleave(k, 0), state)
        log_p = logits.float().log_softmax(-1).view(n, k, positions, -1)
        scores.append(log_p.gather(-1, target[at : at + n, None, :, None].expand(n, k, positions, 1))[..., 0])
    scores = torch.cat(scores)
    weight = prior + first[:, read[:, 0]].T  # (W, K + 1): the posterior after the first character
    losses = []
    for p in range(positions):
        weight = weight - weight.logsumexp(1, keepdim=True)
        losses.append(-(weight + scores[:, :, p]).logsumexp(1).mean().item())
        weight = weight + scores[:, :, p]
    return losses


@torch.no_grad()
def warm_mix(model, mix: StartMix | None, val: torch.Tensor, windows: int, context: int, seed: int,
             fit_windows: int = 1024) -> list[float]:
    """Loss at positions 1..POSITIONS read after `context` characters (cold_start's places)
    with the start mix's k-gram mixed in too (its last 10 characters before each
    prediction), at one weight per position fit on other places (seed + 1): what the
    k-gram would add where the network has context, were it mixed everywhere."""
    if mix is None:
        raise SystemExit("--warm-mix needs a checkpoint trained with the start mix")
    grid = torch.linspace(0, 1, 41, dtype=torch.float64)

    def read(places: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        span = val[places[:, None] + torch.arange(-context, POSITIONS + 1)].long()
        target = span[:, context + 1 :]
        logits, _ = model(span[:, : context + POSITIONS])  # fresh, but only the last 10 are scored
        net = logits[:, -POSITIONS:].float().log_softmax(-1).gather(-1, target[..., None])[..., 0].double()
        kgram = torch.stack([mix.log_probs(span[:, context + t + 1 - POSITIONS : context + t + 1]).gather(-1, target[:, t : t + 1])[:, 0]
                             for t in range(POSITIONS)], 1).double()
        return net, kgram

    def mixed(net, kgram, w):  # (W, P) each, w (G,) -> (W, P, G)
        return torch.logaddexp(net[..., None] + (1 - w).log(), kgram[..., None] + w.log())

    net, kgram = read(cold_start_places(len(val), fit_windows, context, POSITIONS, torch.Generator().manual_seed(seed + 1)))
    best = grid[(-mixed(net, kgram, grid).mean(0)).argmin(-1)]  # (P,)
    net, kgram = read(cold_start_places(len(val), windows, context, POSITIONS, torch.Generator().manual_seed(seed)))
    chosen = torch.logaddexp(net + (1 - best).log(), kgram + best.log())
    return (-chosen.mean(0)).tolist()


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
    the same text. The start mix's own k-gram (charrnn.model.startmix: Witten-Bell interpolation
    down to an add-one unigram, so contexts unseen in training still get a probability)."""
    if positions <= 0:
        return []
    kgram = StartMix.build(train, vocab_size, order=positions + 1, max_grams=len(train) * (positions + 1))
    span = val[torch.tensor(places)[:, None] + torch.arange(positions + 1)].long()  # (W, P + 1)
    return [-kgram.log_probs(span[:, :p]).gather(-1, span[:, p : p + 1]).double().mean().item()
            for p in range(1, positions + 1)]


if __name__ == "__main__":
    main()

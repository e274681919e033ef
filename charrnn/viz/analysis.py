"""What the network computes, character by character: the numbers behind `charrnn viz`.

`trace` reads a text from the learned start state, one character at a time, and records
at every position the model's loss on the character, its top-5 guesses, every unit's
activation and (for the LSTM cells and the GRU) every gate. The recurrence is re-run
step by step from the layer's own weights, because the fused kernels (nn.LSTM, nn.GRU)
never expose their gates; the equations are those of the cells (PyTorch's gate order):

    LSTM  i, f, g, o = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh   (split in four)
          c_t = sigma(f) c_{t-1} + sigma(i) tanh(g),  h_t = sigma(o) tanh(c_t)
          (peephole: + p_i c_{t-1}, + p_f c_{t-1}, + p_o c_t; layernorm: LN on the two
          projections and on c_t before the tanh; see charrnn.model.cells)
    GRU   r = sigma(W_ir x + b_ir + W_hr h + b_hr),  z = sigma(W_iz x + b_iz + W_hz h + b_hz)
          n = tanh(W_in x + b_in + r (W_hn h + b_hn)),  h_t = (1 - z) n + z h_{t-1}
    RNN   h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)

The activation shown per unit is tanh(c_t) for the LSTM cells (the cell state, squashed
to -1..1 as the output gate sees it) and h_t for gru and rnn. `feature_scores` then asks,
for simple properties of the text computed from the characters alone (inside quotes,
bracket depth, position in the line, ...), which unit tracks each best, and what the best
score is for the same feature shifted out of alignment (chance for a search over every unit).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from charrnn.celltypes import CELL_TYPES
from charrnn.model.cells import lstm_pointwise
from charrnn.model.network import LSTM_CELLS, CharRNN, evaluating
from charrnn.model.startmix import StartMix


@dataclass
class Trace:
    """Everything recorded while reading `ids` (N characters)."""

    ids: list[int]
    loss: torch.Tensor  # (N,) nats; position 0 is predicted from the start state alone
    top_ids: torch.Tensor  # (N, 5) the likeliest characters at each position, before reading it
    top_probs: torch.Tensor  # (N, 5)
    activations: list[torch.Tensor]  # per layer (N, H): tanh(c) for LSTM cells, h otherwise
    gates: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per layer {name: (N, H)}


@torch.no_grad()
def trace(model: CharRNN, ids: list[int], prior: StartMix | None = None) -> Trace:
    """Read ids (N >= 1) from the learned start state, in fp32 on the model's device; the
    prior mixed into the first predictions as `evaluate` and `generate` mix it, so the
    losses here are eval's, character by character."""
    with evaluating(model):
        return _trace(model, ids, prior)


def _trace(model: CharRNN, ids: list[int], prior: StartMix | None) -> Trace:
    device = next(model.parameters()).device
    cell = model.config.cell
    x = torch.tensor(ids, device=device)
    hidden = model.embedding(x).float()  # (N, E)
    start = model.init_state(1, device)  # (L, 1, H) each
    activations, gates = [], []
    for layer, rnn in enumerate(model.layers):
        h0 = start[0][layer, 0].float()
        c0 = start[1][layer, 0].float() if cell in LSTM_CELLS else None
        hidden, act, layer_gates = _run_layer(rnn, cell, hidden, h0, c0)
        activations.append(act.cpu())
        gates.append({name: g.cpu() for name, g in layer_gates.items()})
    logits = model.head(hidden).float()  # (N, V): logits[t] predicts ids[t + 1]
    if prior is not None:
        logits = prior.mix(logits[None], x[None])[0]
    log_probs = F.log_softmax(logits, dim=-1)
    n = len(ids)
    loss = torch.full((n,), float("nan"))
    top_ids = torch.full((n, 5), -1, dtype=torch.long)
    top_probs = torch.zeros(n, 5)
    if n > 1:
        loss[1:] = -log_probs[:-1].gather(1, x[1:, None])[:, 0].cpu()
        k = min(5, logits.shape[1])
        probs, found = log_probs[:-1].exp().topk(k, dim=-1)
        top_ids[1:, :k], top_probs[1:, :k] = found.cpu(), probs.cpu()
    return Trace(list(ids), loss, top_ids, top_probs, activations, gates)


def _run_layer(rnn, cell: str, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
    """One layer over x (N, I) from (h, c) (H,) -> outputs (N, H), activations (N, H), gates."""
    weight_hh = rnn.weight_hh_l0.float()
    kind = CELL_TYPES[cell]
    if kind.hand_written:
        projected = rnn._project(x)  # W_ih x + b (LN_x in a layernorm cell), as the layer computes it
    else:
        projected = F.linear(x, rnn.weight_ih_l0.float(), rnn.bias_ih_l0.float())
    outputs, acts = [], []
    names = kind.gate_names
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for step in projected:
        if cell == "gru":
            r_x, z_x, n_x = step.split(h.shape[0])
            r_h, z_h, n_h = F.linear(h, weight_hh, rnn.bias_hh_l0.float()).split(h.shape[0])
            r, z = torch.sigmoid(r_x + r_h), torch.sigmoid(z_x + z_h)
            h = (1 - z) * torch.tanh(n_x + r * n_h) + z * h
            recorded["reset"].append(r)
            recorded["update"].append(z)
            acts.append(h)
        elif cell == "rnn":
            h = torch.tanh(step + F.linear(h, weight_hh, rnn.bias_hh_l0.float()))
            acts.append(h)
        else:
            recurrent = F.linear(h, weight_hh)
            if kind.layer_norm:
                recurrent = rnn.norm_h(recurrent)
            elif not kind.hand_written:  # nn.LSTM keeps b_hh apart; HandLSTM folded it into the projection
                recurrent = recurrent + rnn.bias_hh_l0.float()
            peephole = (rnn.peephole_i, rnn.peephole_f, rnn.peephole_o) if kind.peephole else None
            h, c, (i, f, o) = lstm_pointwise(step + recurrent, c, peephole, rnn.norm_c if kind.layer_norm else None)
            recorded["input"].append(i)
            recorded["forget"].append(f)
            recorded["output"].append(o)
            acts.append(torch.tanh(c))
        outputs.append(h)
    return torch.stack(outputs), torch.stack(acts), {name: torch.stack(v) for name, v in recorded.items()}


# -- features of the text, computed from the characters alone ---------------------------

# name -> binary (AUROC) or not (correlation); "code" features apply to code-like text.
FEATURES = {
    "inside double quotes": True,
    "inside single quotes": True,
    "bracket depth": False,
    "position in the line": False,
    "start of a line": True,
    "inside a word": True,
    "all-caps run": True,
    "inside a comment (#, //)": True,
}


def text_features(text: str) -> dict[str, torch.Tensor]:
    """Each feature's value (float (N,)) at every character, after reading it."""
    n = len(text)
    values = {name: torch.zeros(n) for name in FEATURES}
    double = single = comment = False
    depth = column = 0
    for t, ch in enumerate(text):
        quote_mark = False
        before = text[t - 1] if t else "\n"
        after = text[t + 1] if t + 1 < n else " "
        if ch == "\n":
            comment, column = False, 0
        else:
            column += 1
        if ch == '"':
            double = not double
        elif ch == "'":
            # An apostrophe inside a word (don't) is not a quote: open after a non-letter,
            # close before one.
            if not single and not before.isalnum():
                single = quote_mark = True
            elif single and not after.isalnum():
                single, quote_mark = False, True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        if ch == "#" or (ch == "/" and before == "/"):
            comment = True
        values["inside double quotes"][t] = double or ch == '"'
        values["inside single quotes"][t] = single or quote_mark
        values["bracket depth"][t] = depth
        values["position in the line"][t] = column
        values["start of a line"][t] = before == "\n"
        values["inside a word"][t] = ch.isalpha() and before.isalpha()
        values["all-caps run"][t] = ch.isupper() and (before.isupper() or after.isupper())
        values["inside a comment (#, //)"][t] = comment
    return values


def _standardise(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(0)
    return x / x.norm(dim=0).clamp_min(1e-12)


def scores(units: torch.Tensor, feature: torch.Tensor, binary: bool) -> torch.Tensor:
    """How well each unit (column of units (N, U)) tracks the feature (N,), 0 (chance) to 1.

    Binary features: |2 AUROC - 1| (AUROC from the Mann-Whitney rank sum: the chance that
    a position with the feature has the higher activation); others: |Pearson r|."""
    if not binary:
        return (_standardise(units) * _standardise(feature[:, None])).sum(0).abs()
    positive = feature > 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return torch.zeros(units.shape[1])
    ranks = units.argsort(0).argsort(0).double() + 1  # (N, U); ties broken by position
    auc = (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return (2 * auc - 1).abs().float()


def auroc_of(score: float) -> float:
    """The AUROC (the unit oriented to rise with the feature) behind a binary score."""
    return (1 + score) / 2


@dataclass
class Finding:
    feature: str
    binary: bool
    present: int  # positions where a binary feature holds, or distinct values of the other
    layer: int
    unit: int
    score: float  # 0 = chance, 1 = perfect (see scores)
    control: float  # the best score of any unit for the feature shifted out of alignment


def feature_scores(activations: list[torch.Tensor], text: str, seed: int = 0) -> list[Finding]:
    """The best unit for each feature of the text, beside the shifted-feature control.

    The control shifts the feature circularly by a random offset (at least a tenth of the
    text): its runs and frequencies stay as they were, its alignment with the text goes.
    Its best score over every unit is what a search over that many units finds by chance."""
    units = torch.cat(activations, dim=1).double()  # (N, L*H)
    hidden = activations[0].shape[1]
    generator = torch.Generator().manual_seed(seed)
    n = len(text)
    findings = []
    for name, values in text_features(text).items():
        binary = FEATURES[name]
        present = int(values.sum()) if binary else len(values.unique())
        if (binary and not 0 < present < n) or (not binary and present < 2):
            continue  # constant over this text: nothing to track
        found = scores(units, values.double(), binary)
        best = int(found.argmax())
        low = max(1, n // 10)
        shift = int(torch.randint(low, max(low + 1, n - low), (1,), generator=generator))
        control = float(scores(units, values.roll(shift).double(), binary).max())
        findings.append(Finding(name, binary, present, best // hidden, best % hidden, float(found[best]), control))
    return findings


def saturation(gates: list[dict[str, torch.Tensor]], low: float = 0.1, high: float = 0.9) -> list[dict[str, dict]]:
    """Per layer and gate, each unit's fraction of steps left- (< low) and right-saturated (> high)."""
    return [{name: {"left": (g < low).float().mean(0), "right": (g > high).float().mean(0)}
             for name, g in layer.items()} for layer in gates]


CLASSES = ("letters", "spaces", "punctuation", "digits", "newlines", "start of a word", "inside a word")


def loss_by_class(text: str, loss: torch.Tensor) -> dict[str, dict[str, float]]:
    """Mean loss (bits) and count of the characters of each class (positions 1.. of text)."""
    sums = {name: [0.0, 0] for name in CLASSES}
    for t in range(1, len(text)):
        value = float(loss[t])
        ch, before = text[t], text[t - 1]
        names = []
        if ch.isalpha():
            names += ["letters", "inside a word" if before.isalpha() else "start of a word"]
        elif ch == "\n":
            names.append("newlines")
        elif ch.isspace():
            names.append("spaces")
        elif ch.isdigit():
            names.append("digits")
        elif unicodedata.category(ch).startswith(("P", "S")):
            names.append("punctuation")
        for name in names:
            sums[name][0] += value
            sums[name][1] += 1
    log2 = torch.log(torch.tensor(2.0)).item()
    return {name: {"bits": total / count / log2, "count": count} for name, (total, count) in sums.items() if count}

"""Hand-written LSTM layers that nn.LSTM lacks: peephole connections and layer norm.

Each is a drop-in for a single-layer `nn.LSTM(batch_first=True)`: the same parameter
names (weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0, gate order i, f, g, o), the
same call `layer(x, (h, c)) -> (output, (h, c))` with (1, B, H) states. The input
projection of all T steps is one matmul before the time loop; the loop does the rest.

Peephole LSTM (Gers & Schmidhuber 2000), diagonal peephole weights p_i, p_f, p_o:
    f_t = sigma(W_f [h_{t-1}, x_t] + p_f * C_{t-1} + b_f)
    i_t = sigma(W_i [h_{t-1}, x_t] + p_i * C_{t-1} + b_i)
    C~_t = tanh(W_C [h_{t-1}, x_t] + b_C),   C_t = f_t * C_{t-1} + i_t * C~_t
    o_t = sigma(W_o [h_{t-1}, x_t] + p_o * C_t + b_o),   h_t = o_t * tanh(C_t)
With p = 0 it is exactly nn.LSTM.

Layer-norm LSTM (Ba et al. 2016): the input and recurrent gate pre-activations are
normalised separately, and so is the cell state before the output tanh:
    gates = LN_x(W_ih x_t) + LN_h(W_hh h_{t-1}) + b,   h_t = o_t * tanh(LN_c(C_t))
With normalisation disabled (`layer_norm=False`) it is exactly nn.LSTM.

Why the time loop is plain eager PyTorch, neither scripted nor compiled: at 2x512 on the
2-core CPU a layer's step is bound by its matmuls and by memory traffic, not by Python or
autograd overhead. Measured per layer, forward + backward, B=64, T=100, bf16 autocast
(2026-11-27): this loop 185-195 ms; the same step under torch.compile 203-218 ms (plus
15 s of compiling per process); the whole loop as one autograd Function with a
hand-written backward through time 215 ms; nn.LSTM (oneDNN) 155 ms. What did pay was
folding the bias into the input matmul (0.56-0.71x of nn.LSTM -> 0.77-0.86x, training
steps of the whole model in scripts/bench.py; docs/benchmarks.md has the runs).

Recurrent dropout (Gal & Ghahramani 2016, Keras `recurrent_dropout`): one mask per
sequence, drawn at its first step, multiplies h_{t-1} at every step; off in eval mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def lstm_pointwise(gates: torch.Tensor, c: torch.Tensor, peephole=None, norm_c=None):
    """One LSTM step after its matmuls, written once for the hand-written layers, the packed
    decoder (charrnn.infer.decode) and `charrnn viz` (charrnn.viz.analysis).

    gates (..., 4H): the pre-activations in nn.LSTM's order i, f, C~, o; c (..., H): C_{t-1};
    peephole: (p_i, p_f, p_o) or None; norm_c: applied to C_t before the output tanh
    (LN_c of the layer-norm cell) or None. Returns h_t, C_t and the gates (i, f, o) after
    their sigmoids."""
    i, f, g, o = gates.chunk(4, dim=-1)
    if peephole is not None:
        i = i + peephole[0] * c
        f = f + peephole[1] * c
    i, f = torch.sigmoid(i), torch.sigmoid(f)
    c = f * c + i * torch.tanh(g)
    if peephole is not None:
        o = o + peephole[2] * c
    o = torch.sigmoid(o)
    h = o * torch.tanh(norm_c(c) if norm_c is not None else c)
    return h, c, (i, f, o)


class HandLSTM(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, peephole: bool = False, layer_norm: bool = False,
                 recurrent_dropout: float = 0.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.peephole = peephole
        self.layer_norm = layer_norm
        self.recurrent_dropout = recurrent_dropout
        gates = 4 * hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(gates))
        self.bias_hh_l0 = nn.Parameter(torch.empty(gates))
        bound = 1.0 / math.sqrt(hidden_size)  # nn.LSTM's own initialisation
        for weight in (self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0):
            nn.init.uniform_(weight, -bound, bound)
        if peephole:
            # Start at 0: the layer begins as a plain LSTM and learns how much to peek.
            self.peephole_i = nn.Parameter(torch.zeros(hidden_size))
            self.peephole_f = nn.Parameter(torch.zeros(hidden_size))
            self.peephole_o = nn.Parameter(torch.zeros(hidden_size))
        if layer_norm:
            self.norm_x = nn.LayerNorm(gates)
            self.norm_h = nn.LayerNorm(gates)
            self.norm_c = nn.LayerNorm(hidden_size)
        self.last_mask: torch.Tensor | None = None  # the recurrent dropout mask of the last call

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """x: (B, T, I), state: (h, c) each (1, B, H) -> output (B, T, H), (h, c)."""
        h, c = state[0][0], state[1][0]  # (B, H)
        projected = self._project(x)  # (B, T, 4H): every step's input part at once
        mask = None
        if self.training and self.recurrent_dropout > 0:
            keep = 1.0 - self.recurrent_dropout
            mask = (torch.rand(h.shape, device=h.device) < keep).to(h.dtype) / keep  # (B, H), one per sequence
        self.last_mask = mask
        outputs = []
        peephole = (self.peephole_i, self.peephole_f, self.peephole_o) if self.peephole else None
        norm_c = self.norm_c if self.layer_norm else None
        # unbind, not projected[:, t]: indexing's backward would build and fill a whole
        # (B, T, 4H) zero tensor per step (measured: 2/3 of a training step).
        for step_input in projected.unbind(1):
            h_in = h * mask if mask is not None else h
            recurrent = F.linear(h_in, self.weight_hh_l0)  # (B, 4H); autocast caches the bf16 weight
            if self.layer_norm:
                recurrent = self.norm_h(recurrent)
            h, c, _ = lstm_pointwise(step_input + recurrent, c, peephole, norm_c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h[None], c[None])

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """W_ih x_t + b for all T steps in one matmul, or LN_x(W_ih x_t) + b. The bias goes
        into the matmul (or into LN_x's shift), not a separate add: a broadcast add over
        (B, T, 4H) and its backward took a sixth of a layernorm step."""
        bias = self.bias_ih_l0 + self.bias_hh_l0
        if not self.layer_norm:
            return F.linear(x, self.weight_ih_l0, bias)
        projected = F.linear(x, self.weight_ih_l0)
        norm = self.norm_x
        if isinstance(norm, nn.LayerNorm):
            return F.layer_norm(projected, norm.normalized_shape, norm.weight, norm.bias + bias, norm.eps)
        return norm(projected) + bias  # a test swaps the norms for nn.Identity

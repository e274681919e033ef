"""The network: embedding -> stacked recurrent layers -> dropout -> linear head.

State in, state out: `forward(x, state)` returns the logits and the state after the
last character, so a long text can be run in chunks (truncated BPTT, evaluation,
sampling) with the state carried across. A state is always a tuple of (L, B, H)
tensors: (h, c) for an LSTM, (h,) for a GRU or vanilla RNN.

The network is pure: the same inputs give the same logits whoever calls it, and no
state is the learned start state (`forward(x)` equals `forward(x, init_state(B))`).
Tricks of decoding and scoring (temperature, the start mix's prior over the first
predictions) live in the decoder and the scorer, which take them as arguments.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from charrnn.celltypes import CELL_TYPES
from charrnn.config import ModelConfig
from charrnn.model.cells import HandLSTM

State = tuple[torch.Tensor, ...]

LSTM_CELLS = tuple(name for name, cell in CELL_TYPES.items() if cell.has_cell_state)  # state (h, c)


def _layer(config: ModelConfig, input_size: int) -> nn.Module:
    """One recurrent layer of the configured cell."""
    cell = CELL_TYPES[config.cell]
    if cell.hand_written:
        return HandLSTM(input_size, config.hidden_size, peephole=cell.peephole, layer_norm=cell.layer_norm,
                        recurrent_dropout=config.recurrent_dropout)
    return getattr(nn, cell.fused)(input_size, config.hidden_size, 1, batch_first=True)


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, config.embedding_size)
        # One single-layer module per layer (each still one cuDNN / oneDNN call), so the
        # dropout between layers is ours: nn.LSTM's own costs a quarter of a CPU step.
        self.layers = nn.ModuleList(
            _layer(config, config.embedding_size if layer == 0 else config.hidden_size)
            for layer in range(config.num_layers)
        )
        self.head = nn.Linear(config.hidden_size, vocab_size)
        # The learned start state (h0[, c0] of every layer): where every sequence begins
        # when no state is carried in (sampling, eval, each stateless window, a restarted
        # stream). It starts at zero, the classic start, and training moves it to a state
        # the model reads well from: from zero a model trained on carried state alone has
        # hardly ever started, so its first characters after a short prime were garbage.
        count = CELL_TYPES[config.cell].state_size
        self.start_state = nn.Parameter(torch.zeros(count, config.num_layers, config.hidden_size))  # (S, L, H)
        self._initialise()
        self.reset_forget_bias(config.forget_bias)
        self.last_weight_masks: list[torch.Tensor] = []  # the weight-drop masks of the last call, per layer

    def _initialise(self) -> None:
        """Apply config.init to the recurrent layers (see ModelConfig.init for why)."""
        if self.config.init == "default":
            return
        with torch.no_grad():
            for rnn in self.layers:
                for name, weight in rnn.named_parameters():
                    if self.config.init == "uniform":
                        weight.uniform_(-0.08, 0.08)
                    elif name.startswith("weight_hh"):
                        for block in weight.split(self.config.hidden_size):  # one square matrix per gate
                            nn.init.orthogonal_(block)

    def reset_forget_bias(self, value: float = 1.0) -> None:
        """Start the LSTM forget gates open (bias 1) so early gradients flow through time.

        nn.LSTM orders its gates i, f, g, o and adds two biases; the forget slice of
        bias_ih is set to `value` and that of bias_hh to 0.
        """
        if self.config.cell not in LSTM_CELLS:
            return
        hidden = self.config.hidden_size
        with torch.no_grad():
            for rnn in self.layers:
                rnn.bias_ih_l0[hidden : 2 * hidden].fill_(value)
                rnn.bias_hh_l0[hidden : 2 * hidden].zero_()

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """The learned start state of a fresh sequence, (L, B, H) each."""
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        start = self.start_state if device is None else self.start_state.to(device)
        return tuple(s[:, None, :].expand(shape).contiguous() for s in start)

    def restart(self, state: State, reset: torch.Tensor) -> State:
        """Carried state with the streams where reset (B,) is True set to the start state.

        Used at every stateful step (with an all-False mask too), so the start state
        always takes part in the graph, as DistributedDataParallel requires."""
        start = self.init_state(reset.shape[0])
        keep = ~reset[None, :, None]  # (1, B, 1)
        return tuple(torch.where(keep, s, s0.to(s.dtype)) for s, s0 in zip(state, start))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (B, T) character ids -> logits (B, T, V) and the state after x (None: the start state)."""
        if state is None:
            state = self.init_state(x.shape[0])
        p = self.config.dropout if self.training else 0.0
        hidden = dropout(self.embedding(x), self.config.embedding_dropout if self.training else 0.0)  # (B, T, E)
        layer_states = []
        drop_weights = self.training and self.config.weight_drop > 0
        self.last_weight_masks = []
        for layer, rnn in enumerate(self.layers):
            if layer:
                hidden = dropout(hidden, p)
            mine = tuple(s[layer : layer + 1] for s in state)  # (1, B, H) each
            args = (hidden, mine if self.config.cell in LSTM_CELLS else mine[0])
            if drop_weights:
                hidden, new = self._weight_dropped(rnn, args)
            else:
                hidden, new = rnn(*args)  # (B, T, H)
            layer_states.append(new if isinstance(new, tuple) else (new,))
        logits = self.head(dropout(hidden, p))  # (B, T, V)
        new_state = tuple(torch.cat(parts) for parts in zip(*layer_states))  # (L, B, H) each
        return logits, new_state

    def _weight_dropped(self, rnn: nn.Module, args: tuple) -> tuple:
        """The layer run with DropConnect on its recurrent weights (AWD-LSTM's weight drop,
        Merity et al. 2017): one mask over weight_hh per call, so the same connections are
        dropped at every time step and for every sequence of the batch.

        The masked matrix is swapped in with torch.func.functional_call, so nn.LSTM, nn.GRU
        and nn.RNN still make their one fused call (oneDNN, cuDNN): the parameter itself is
        never modified (awd-lstm-lm's in-place variant fell off the fused path)."""
        weight = rnn.weight_hh_l0
        keep = 1.0 - self.config.weight_drop
        mask = (torch.rand(weight.shape, device=weight.device) < keep).to(weight.dtype) / keep  # (G*H, H)
        self.last_weight_masks.append(mask)
        return torch.func.functional_call(rnn, {"weight_hh_l0": weight * mask}, args)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout. On CPUs the mask comes from torch.rand, about 3.5x faster than the
    bernoulli_ sampling inside F.dropout, which took a quarter of a training step."""
    if p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)  # fused kernels on GPUs
    keep = 1.0 - p
    scale = (torch.rand(x.shape) < keep).to(x.dtype) * (1.0 / keep)
    return x * scale


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (no dropout) inside the block, in the mode it had after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def detach(state: State) -> State:
    """Cut the graph at a batch boundary (truncated BPTT) but keep the values."""
    return tuple(s.detach() for s in state)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

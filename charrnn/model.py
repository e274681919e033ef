"""The network: embedding -> stacked recurrent layers -> dropout -> linear head.

State in, state out: `forward(x, state)` returns the logits and the state after the
last character, so a long text can be run in chunks (truncated BPTT, evaluation,
sampling) with the state carried across. A state is always a tuple of (L, B, H)
tensors: (h, c) for an LSTM, (h,) for a GRU or vanilla RNN.
"""

from __future__ import annotations

import torch
from torch import nn

from charrnn.config import ModelConfig

State = tuple[torch.Tensor, ...]

_RECURRENT = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, config.embedding_size)
        self.rnn = _RECURRENT[config.cell](
            config.embedding_size,
            config.hidden_size,
            config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, vocab_size)
        self.reset_forget_bias()

    def reset_forget_bias(self, value: float = 1.0) -> None:
        """Start the LSTM forget gates open (bias 1) so early gradients flow through time.

        nn.LSTM orders its gates i, f, g, o and adds two biases; the forget slice of
        bias_ih is set to `value` and that of bias_hh to 0.
        """
        if self.config.cell != "lstm":
            return
        hidden = self.config.hidden_size
        with torch.no_grad():
            for layer in range(self.config.num_layers):
                getattr(self.rnn, f"bias_ih_l{layer}")[hidden : 2 * hidden].fill_(value)
                getattr(self.rnn, f"bias_hh_l{layer}")[hidden : 2 * hidden].zero_()

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """The all-zero state of a fresh sequence."""
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        count = 2 if self.config.cell == "lstm" else 1
        return tuple(torch.zeros(shape, device=device) for _ in range(count))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (B, T) character ids -> logits (B, T, V) and the state after x."""
        if state is None:
            state = self.init_state(x.shape[0], x.device)
        embedded = self.embedding(x)  # (B, T, E)
        packed = state if self.config.cell == "lstm" else state[0]
        output, new_state = self.rnn(embedded, packed)  # (B, T, H)
        logits = self.head(self.dropout(output))  # (B, T, V)
        new_state = tuple(new_state) if isinstance(new_state, tuple) else (new_state,)
        return logits, new_state


def detach(state: State) -> State:
    """Cut the graph at a batch boundary (truncated BPTT) but keep the values."""
    return tuple(s.detach() for s in state)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

"""The recurrent cells charrnn builds, and what every module needs to know of each.

One table instead of string checks scattered over the model, the decoder, the sizing
rule, the checkpoint reader and the report. Torch-free, so config validation can use it.

A new cell is a row here plus its layer (charrnn.model.network / charrnn.model.cells), its decoder
path (charrnn.infer.decode) and its equations in charrnn.viz.analysis.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CellType:
    name: str
    gates: int  # blocks of rows in weight_ih / weight_hh: LSTM i f g o, GRU r z n, RNN 1
    gate_names: tuple[str, ...]  # the gates `charrnn viz` reports, by saturation
    fused: str | None  # the torch.nn class that runs it in one cuDNN / oneDNN call; None: charrnn.model.cells.HandLSTM
    peephole: bool = False  # HandLSTM options
    layer_norm: bool = False
    decoder: str = "cell"  # charrnn.infer.decode: "lstm" packs nn.LSTM's fused gates, "cell" decodes the rest
    description: str = ""

    @property
    def has_cell_state(self) -> bool:
        """State (h, c) rather than (h,): the LSTM family."""
        return self.gates == 4

    @property
    def hand_written(self) -> bool:
        return self.fused is None

    @property
    def state_size(self) -> int:
        return 2 if self.has_cell_state else 1

    def extra_parameters(self, hidden: int) -> int:
        """Parameters per layer beyond the weight matrices and the two biases."""
        if self.peephole:
            return 3 * hidden  # the diagonal peephole weights p_i, p_f, p_o
        if self.layer_norm:
            return 2 * (2 * self.gates * hidden) + 2 * hidden  # gains and shifts of LN_x, LN_h and LN_c
        return 0


_LSTM_GATES = ("input", "forget", "output")
CELL_TYPES = {cell.name: cell for cell in (
    CellType("lstm", 4, _LSTM_GATES, "LSTM", decoder="lstm", description="nn.LSTM: cuDNN on NVIDIA GPUs, oneDNN on CPUs"),
    CellType("gru", 3, ("reset", "update"), "GRU", description="nn.GRU, a baseline"),
    CellType("rnn", 1, (), "RNN", description="nn.RNN (tanh), the vanilla baseline"),
    CellType("peephole", 4, _LSTM_GATES, None, peephole=True, description="LSTM with peepholes (Gers & Schmidhuber 2000)"),
    CellType("layernorm", 4, _LSTM_GATES, None, layer_norm=True, description="layer-normalised LSTM (Ba et al. 2016)"),
)}
CELLS = tuple(CELL_TYPES)

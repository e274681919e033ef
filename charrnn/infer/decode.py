"""Fast incremental decoding: one character per step for N streams at once.

`nn.LSTM` pays a large fixed cost per call, which dominates when each call is one
character (batch 1, T = 1). This decoder packs the weights once and runs each step as:

    layer 0:  gates = table[id] + h_0 @ W_hh0^T        (table = Emb @ W_ih0^T + biases, (V, 4H))
    layer l:  gates = b_l + [h_{l-1}, h_l] @ [W_ih; W_hh]_l^T   (one matmul per layer)
    LSTM:     i, f, o = sigma(gates[:3H]), g = tanh(gates[3H:])   (rows reordered i, f, o, g)
              c = f * c + i * g,  h = o * tanh(c)
    head:     logits = b + h_top @ W_head^T

into buffers allocated once. On CUDA the step is captured as a CUDA graph and replayed.
In fp32 it computes what `CharRNN.forward` computes (a test checks the sampled text is the
same for the same seed); with dtype=bf16 (the autocast policy of `--dtype auto`) the
matmuls run in bf16 with fp32 gates and cell state. With invariant=True (the server's
decoder, on a CPU, fp32, where charrnn.infer._rows is built) the products run on charrnn.infer.rows'
kernel, whose row bits do not depend on the number of streams.

`CellDecoder` does the same for the other cells (gru, rnn, peephole, layernorm): layer
0's input part, W_ih Emb[id] + b (through LN_x for layernorm), is a table row; each step
is the cell's own equations on packed weights. `make_decoder` picks the class.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from charrnn.celltypes import CELL_TYPES
from charrnn.infer import rows as row_kernel
from charrnn.model.cells import lstm_pointwise
from charrnn.model.network import CharRNN


def make_decoder(model: CharRNN, num_streams: int, device: torch.device | str = "cpu",
                 cuda_graph: bool = True, dtype: torch.dtype | None = None, invariant: bool = False) -> "Decoder":
    """invariant: a stream's results do not depend on num_streams, bit for bit (charrnn.infer.rows'
    kernel; taken where it can be: see Decoder.invariant)."""
    kind = LSTMDecoder if CELL_TYPES[model.config.cell].decoder == "lstm" else CellDecoder
    return kind(model, num_streams, device, cuda_graph, dtype, invariant)


class Decoder:
    """What every packed decoder shares: the head, the id and logits buffers, and the
    CUDA graph. A subclass packs its layers, keeps its state in buffers updated in place
    (`state_buffers`) and writes self.logits in `_step`."""

    def __init__(self, model: CharRNN, num_streams: int, device: torch.device | str, cuda_graph: bool,
                 dtype: torch.dtype | None, invariant: bool = False):
        self.device = torch.device(device)
        self.hidden, self.layers = model.config.hidden_size, model.config.num_layers
        self.mm_dtype = matmul_dtype(dtype, num_streams, self.device)
        self.exact = self.mm_dtype == torch.float32
        # Row-invariant products: asked for, and possible (fp32 on a CPU, the kernel built).
        self.invariant = invariant and self.exact and self.device.type == "cpu" and row_kernel.available()
        self.threads = 1  # the kernel's threads (it splits only from rows.SPLIT_ROWS rows)
        # Scratch rows below the streams' in every buffer the cell's elementwise maths runs
        # on: ATen runs an op over a contiguous tensor as one flat loop, vectors first, and
        # its last < 2 vectors of elements through a scalar path whose tanh or sigmoid may
        # differ in the last bit; with TAIL elements of scratch that tail is never a stream's.
        self.pad = -(-TAIL // self.hidden) if self.invariant else 0
        with torch.no_grad():
            self.w_head = model.head.weight.T.contiguous().to(self.device, self.mm_dtype)  # (H, V)
            self.b_head = model.head.bias.float().to(self.device)
        self.p_head = self._packed(self.w_head)
        self.vocab_size = model.vocab_size
        self.graph = None
        self.use_graph = cuda_graph and self.device.type == "cuda"

    def _allocate(self, num_streams: int) -> None:
        """The per-stream buffers, zeroed: what `with_streams` makes anew (with self.pad
        scratch rows, for the ids and in the subclasses' buffers)."""
        self.num_streams = num_streams
        self.logits = torch.empty(num_streams, self.vocab_size, device=self.device)
        self.ids = torch.zeros(num_streams + self.pad, dtype=torch.long, device=self.device)

    def with_streams(self, num_streams: int) -> "Decoder":
        """A decoder for num_streams streams sharing these packed weights (and their matmul
        precision), its state zero.
        (The server moves its streams into a wider or narrower one as requests come and go.)"""
        other = copy.copy(self)
        other.graph = None
        other._allocate(num_streams)
        return other

    def state_buffers(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def state(self, rows: slice | torch.Tensor = slice(None)) -> tuple[torch.Tensor, ...]:
        """The streams' state in the model's form, (h, c) or (h,), each (L, N, H)."""
        raise NotImplementedError

    @torch.no_grad()
    def move(self, source: slice | torch.Tensor, target: slice | torch.Tensor) -> None:
        """Copy the state of the streams at rows source to rows target."""
        self.load_state(tuple(x.clone() for x in self.state(source)), target)

    def _step(self) -> None:
        raise NotImplementedError

    def _packed(self, w: torch.Tensor) -> "row_kernel.Packed | None":
        return row_kernel.Packed(w) if self.invariant else None

    def _product(self, x: torch.Tensor, packed: "row_kernel.Packed", out: torch.Tensor,
                 init: torch.Tensor | None = None) -> torch.Tensor:
        """out = init + x @ w on the row kernel (init (G,) is broadcast over the rows)."""
        self._bind(x, packed, out, init)(self.threads)
        return out

    def _bind(self, x, packed, out, init=None) -> "row_kernel.bind":
        if init is not None and init.dim() == 1:
            init = init.expand(len(x), -1)
        return row_kernel.bind(x, packed, out, init)

    def _head(self, top: torch.Tensor) -> None:
        if self.invariant:
            self._product(top[: self.num_streams], self.p_head, self.logits, self.b_head)
        elif self.exact:
            torch.addmm(self.b_head, top, self.w_head, out=self.logits)
        else:
            self.logits.copy_(top.to(self.mm_dtype).mm(self.w_head)).add_(self.b_head)

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed (N,) ids; returns the (N, V) logits of the next character (a reused buffer)."""
        self.ids[: self.num_streams].copy_(ids)
        if not self.use_graph:
            self._step()
            return self.logits
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        saved = [x.clone() for x in self.state_buffers()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up kernels and workspaces outside the graph
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        for x, s in zip(self.state_buffers(), saved):  # undo the warm-up steps' effect on the state
            x.copy_(s)


class LSTMDecoder(Decoder):
    def __init__(self, model: CharRNN, num_streams: int, device: torch.device | str = "cpu",
                 cuda_graph: bool = True, dtype: torch.dtype | None = None, invariant: bool = False):
        if CELL_TYPES[model.config.cell].decoder != "lstm":
            raise ValueError("LSTMDecoder packs nn.LSTM weights only")
        super().__init__(model, num_streams, device, cuda_graph, dtype, invariant)
        hidden, layers = self.hidden, self.layers
        rnns = model.layers
        order = torch.cat([torch.arange(0, 2 * hidden), torch.arange(3 * hidden, 4 * hidden),
                           torch.arange(2 * hidden, 3 * hidden)])  # i, f, g, o -> i, f, o, g
        with torch.no_grad():
            w_ih0 = rnns[0].weight_ih_l0[order].float()
            bias0 = (rnns[0].bias_ih_l0 + rnns[0].bias_hh_l0)[order].float()
            self.table = (model.embedding.weight.float() @ w_ih0.T + bias0).to(self.device).contiguous()  # (V, 4H)
            self.w_hh0 = rnns[0].weight_hh_l0[order].T.contiguous().to(self.device, self.mm_dtype)  # (H, 4H)
            self.w_cat, self.b_cat = [], []
            for layer in range(1, layers):
                rnn = rnns[layer]
                w = torch.cat([rnn.weight_ih_l0, rnn.weight_hh_l0], dim=1)
                self.w_cat.append(w[order].T.contiguous().to(self.device, self.mm_dtype))  # (2H, 4H)
                b = rnn.bias_ih_l0 + rnn.bias_hh_l0
                self.b_cat.append(b[order].float().to(self.device))
        self.p_hh0, self.p_cat = self._packed(self.w_hh0), [self._packed(w) for w in self.w_cat]
        self._allocate(num_streams)

    def _allocate(self, num_streams: int) -> None:
        super()._allocate(num_streams)
        n, hidden, to = num_streams, self.hidden, dict(device=self.device)
        rows = n + self.pad
        self.xh_rows = [torch.zeros(rows, 2 * hidden, **to) for _ in range(self.layers)]  # [h_{l-1}, h_l]
        self.c_rows = torch.zeros(self.layers, rows, hidden, **to)
        self.xh, self.c = [xh[:n] for xh in self.xh_rows], self.c_rows[:, :n]  # the streams' own rows
        self.gates = torch.empty(rows, 4 * hidden, **to)
        self.gates_act = torch.empty(rows, 4 * hidden, **to)
        self.tanh_c = torch.empty(rows, hidden, **to)
        if self.invariant:  # the step's products, on the streams' rows of these buffers, checked once
            gates = self.gates[:n]
            self.products = [self._bind(self.xh[0][:, hidden:], self.p_hh0, gates, gates)]
            self.products += [self._bind(self.xh[layer], self.p_cat[layer - 1], gates, self.b_cat[layer - 1])
                              for layer in range(1, self.layers)]
            self.products.append(self._bind(self.xh[-1][:, hidden:], self.p_head, self.logits, self.b_head))

    def state_buffers(self) -> list[torch.Tensor]:
        return [*self.xh, self.c]

    def state(self, rows: slice | torch.Tensor = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([xh[rows, self.hidden :] for xh in self.xh]), self.c[:, rows]

    @torch.no_grad()
    def load_state(self, state: tuple[torch.Tensor, torch.Tensor], rows: slice | torch.Tensor = slice(None)) -> None:
        """Take (h, c), each (L, N, H), e.g. from a forward pass over the prime, into the
        streams at rows (all of them by default)."""
        h, c = state
        for layer in range(self.layers):
            self.xh[layer][rows, self.hidden :] = h[layer]
        self.c[:, rows] = c

    def _step(self) -> None:
        hidden = self.hidden
        gates, act = self.gates, self.gates_act
        for layer in range(self.layers):
            h = self.xh_rows[layer][:, hidden:]
            if layer == 0:
                torch.index_select(self.table, 0, self.ids, out=gates)
                if self.invariant:
                    self.products[0](self.threads)
                elif self.exact:
                    gates.addmm_(h, self.w_hh0)
                else:
                    gates.add_(h.to(self.mm_dtype).mm(self.w_hh0))
            elif self.invariant:
                self.products[layer](self.threads)
            elif self.exact:
                torch.addmm(self.b_cat[layer - 1], self.xh[layer], self.w_cat[layer - 1], out=gates)
            else:
                gates.copy_(self.xh[layer].to(self.mm_dtype).mm(self.w_cat[layer - 1])).add_(self.b_cat[layer - 1])
            torch.sigmoid(gates[:, : 3 * hidden], out=act[:, : 3 * hidden])
            torch.tanh(gates[:, 3 * hidden :], out=act[:, 3 * hidden :])
            c = self.c_rows[layer]
            c.mul_(act[:, hidden : 2 * hidden]).addcmul_(act[:, :hidden], act[:, 3 * hidden :])
            torch.tanh(c, out=self.tanh_c)
            torch.mul(act[:, 2 * hidden : 3 * hidden], self.tanh_c, out=h)  # new h_l, in place
            if layer + 1 < self.layers:
                self.xh_rows[layer + 1][:, :hidden].copy_(h)
        if self.invariant:
            self.products[-1](self.threads)
        else:
            self._head(self.xh[-1][:, hidden:])


class CellDecoder(Decoder):
    """Packed decoding for gru, rnn, peephole and layernorm models (equations in model.py
    and cells.py). Per layer and step: the input part (a table row for layer 0, else
    x @ W_ih^T + b), the recurrent part h @ W_hh^T, then the cell's gate maths in fp32."""

    def __init__(self, model: CharRNN, num_streams: int, device: torch.device | str = "cpu",
                 cuda_graph: bool = True, dtype: torch.dtype | None = None, invariant: bool = False):
        super().__init__(model, num_streams, device, cuda_graph, dtype, invariant)
        self.cell = model.config.cell
        if CELL_TYPES[self.cell].decoder == "lstm":
            raise ValueError("use LSTMDecoder for nn.LSTM models")
        to = dict(device=self.device)
        packed = step_weights(model)
        self.table = packed[0]["table"].to(**to).contiguous()  # (V, G)
        self.w_ih = [None] + [w["w_ih"].T.contiguous().to(self.device, self.mm_dtype) for w in packed[1:]]
        self.w_hh = [w["w_hh"].T.contiguous().to(self.device, self.mm_dtype) for w in packed]
        self.p_ih = [None] + [self._packed(w) for w in self.w_ih[1:]]
        self.p_hh = [self._packed(w) for w in self.w_hh]
        self.in_bias = [w["in_bias"].to(**to) for w in packed]
        self.rec_bias = [None if w["rec_bias"] is None else w["rec_bias"].to(**to) for w in packed]
        self.norms = [None if w["norms"] is None else [(nw.to(**to), nb.to(**to), eps) for nw, nb, eps in w["norms"]]
                      for w in packed]
        self.peepholes = [None if w["peepholes"] is None else tuple(p.to(**to) for p in w["peepholes"])
                          for w in packed]
        self._allocate(num_streams)

    def _allocate(self, num_streams: int) -> None:
        super()._allocate(num_streams)
        shape = (self.layers, num_streams + self.pad, self.hidden)
        self.h_rows = torch.zeros(shape, device=self.device)
        self.c_rows = torch.zeros(shape, device=self.device) if CELL_TYPES[self.cell].has_cell_state else None
        self.h = self.h_rows[:, :num_streams]  # the streams' own rows
        self.c = None if self.c_rows is None else self.c_rows[:, :num_streams]

    def state_buffers(self) -> list[torch.Tensor]:
        return [self.h] if self.c is None else [self.h, self.c]

    def state(self, rows: slice | torch.Tensor = slice(None)) -> tuple[torch.Tensor, ...]:
        return tuple(buffer[:, rows] for buffer in self.state_buffers())

    @torch.no_grad()
    def load_state(self, state: tuple[torch.Tensor, ...], rows: slice | torch.Tensor = slice(None)) -> None:
        """Take the model's state, (h,) or (h, c), each (L, N, H), into the streams at rows."""
        for buffer, value in zip(self.state_buffers(), state):
            buffer[:, rows] = value

    def _matmul(self, x: torch.Tensor, w: torch.Tensor, packed: "row_kernel.Packed | None") -> torch.Tensor:
        if self.invariant:  # the streams' rows; the scratch rows stay zero
            out = torch.zeros(len(x), packed.n, device=self.device)
            self._product(x[: self.num_streams], packed, out[: self.num_streams])
            return out
        return x.mm(w) if self.exact else x.to(self.mm_dtype).mm(w).float()

    def _step(self) -> None:
        x = None
        for layer in range(self.layers):
            norms = self.norms[layer]
            if layer == 0:
                inputs = self.table[self.ids]  # (N, G)
            else:
                inputs = self._matmul(x, self.w_ih[layer], self.p_ih[layer])
                if norms is not None:
                    inputs = F.layer_norm(inputs, inputs.shape[1:], *norms[0])
                inputs = inputs + self.in_bias[layer]
            h = self.h_rows[layer]
            recurrent = self._matmul(h, self.w_hh[layer], self.p_hh[layer])
            if norms is not None:
                recurrent = F.layer_norm(recurrent, recurrent.shape[1:], *norms[1])
            if self.cell == "rnn":
                h.copy_(torch.tanh(inputs + recurrent))
            elif self.cell == "gru":
                self._gru(inputs, recurrent + self.rec_bias[layer], h)
            else:
                self._lstm(inputs + recurrent, h, self.c_rows[layer], self.peepholes[layer], norms)
            x = h
        self._head(x)

    def _gru(self, inputs, recurrent, h) -> None:
        """r, z = sigma(.), n = tanh(x_n + r * (W_hn h + b_hn)), h = (1 - z) n + z h."""
        hidden = self.hidden
        r, z = torch.sigmoid(inputs[:, : 2 * hidden] + recurrent[:, : 2 * hidden]).chunk(2, dim=1)
        n = torch.tanh(inputs[:, 2 * hidden :] + r * recurrent[:, 2 * hidden :])
        h.copy_(torch.lerp(n, h, z))

    def _lstm(self, gates, h, c, peepholes, norms) -> None:
        """Gates i, f, C~, o (nn.LSTM's order) with optional peepholes and LN_c."""
        norm_c = (lambda x: F.layer_norm(x, x.shape[1:], *norms[2])) if norms is not None else None
        h_new, c_new, _ = lstm_pointwise(gates, c, peepholes, norm_c)
        c.copy_(c_new)
        h.copy_(h_new)


TAIL = 64  # elements: more than ATen's scalar tail (< 2 vectors: 32 fp32 with AVX-512)


def matmul_dtype(dtype: torch.dtype | None, num_streams: int, device: torch.device) -> torch.dtype:
    """The precision of the decoder's matmuls: the run's autocast dtype (bf16 where fast),
    except for fewer than 8 streams on a CPU, where fp32 is faster: bf16 matrix-vector
    products measured 321 us a step against 148 us for fp32 at 2x512 (2-core EPYC)."""
    if dtype is None or (device.type == "cpu" and num_streams < 8):
        return torch.float32
    return dtype


def step_weights(network: CharRNN) -> list[dict]:
    """Per layer, the float32 tensors of one step, on the network's device: what
    CellDecoder packs and what `charrnn export` writes into the ONNX graph and the page.
    w_ih (G, in), w_hh (G, H), in_bias (G,), rec_bias (G,) or None (GRU keeps b_hh apart:
    its candidate gate scales W_hn h + b_hn by r), norms [(w, b, eps) of LN_x, LN_h, LN_c]
    or None, peepholes (p_i, p_f, p_o) or None; layer 0 also table (V, G) =
    LN_x(Emb W_ih^T) + in_bias, the input part of every character."""
    cell = network.config.cell
    kind = CELL_TYPES[cell]
    out = []
    with torch.no_grad():
        for index, layer in enumerate(network.layers):
            gru = cell == "gru"
            in_bias = layer.bias_ih_l0 if gru else layer.bias_ih_l0 + layer.bias_hh_l0
            norms = [(n.weight.float(), n.bias.float(), n.eps) for n in (layer.norm_x, layer.norm_h, layer.norm_c)] \
                if kind.layer_norm else None
            entry = {"w_ih": layer.weight_ih_l0.float(), "w_hh": layer.weight_hh_l0.float(),
                     "in_bias": in_bias.float(), "rec_bias": layer.bias_hh_l0.float() if gru else None,
                     "norms": norms, "peepholes": tuple(getattr(layer, f"peephole_{g}").float() for g in "ifo")
                     if kind.peephole else None}
            if index == 0:
                table = network.embedding.weight.float() @ entry["w_ih"].T  # (V, G)
                if norms is not None:
                    table = F.layer_norm(table, table.shape[1:], norms[0][0], norms[0][1], norms[0][2])
                entry["table"] = table + entry["in_bias"]
            out.append(entry)
    return out

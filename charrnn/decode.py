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
matmuls run in bf16 with fp32 gates and cell state. GRU and vanilla-RNN models use the
reference path.
"""

from __future__ import annotations

import torch

from charrnn.model import CharRNN


class LSTMDecoder:
    def __init__(self, model: CharRNN, num_streams: int, device: torch.device | str = "cpu",
                 cuda_graph: bool = True, dtype: torch.dtype | None = None):
        config = model.config
        if config.cell != "lstm":
            raise ValueError("LSTMDecoder packs nn.LSTM weights only")
        self.device = torch.device(device)
        hidden, layers = config.hidden_size, config.num_layers
        self.hidden, self.layers = hidden, layers
        self.mm_dtype = matmul_dtype(dtype, num_streams, self.device)
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
            self.w_head = model.head.weight.T.contiguous().to(self.device, self.mm_dtype)  # (H, V)
            self.b_head = model.head.bias.float().to(self.device)
        n = num_streams
        self.xh = [torch.zeros(n, 2 * hidden, device=self.device) for _ in range(layers)]  # [h_{l-1}, h_l]
        self.c = torch.zeros(layers, n, hidden, device=self.device)
        self.gates = torch.empty(n, 4 * hidden, device=self.device)
        self.gates_act = torch.empty(n, 4 * hidden, device=self.device)
        self.tanh_c = torch.empty(n, hidden, device=self.device)
        self.logits = torch.empty(n, model.vocab_size, device=self.device)
        self.ids = torch.zeros(n, dtype=torch.long, device=self.device)
        self.exact = self.mm_dtype == torch.float32
        self.graph = None
        self.use_graph = cuda_graph and self.device.type == "cuda"

    @torch.no_grad()
    def load_state(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Take (h, c), each (L, N, H), e.g. from a forward pass over the prime."""
        h, c = state
        for layer in range(self.layers):
            self.xh[layer][:, self.hidden :].copy_(h[layer])
        self.c.copy_(c)

    def _step(self) -> None:
        hidden = self.hidden
        gates, act = self.gates, self.gates_act
        for layer in range(self.layers):
            h = self.xh[layer][:, hidden:]
            if layer == 0:
                torch.index_select(self.table, 0, self.ids, out=gates)
                if self.exact:
                    gates.addmm_(h, self.w_hh0)
                else:
                    gates.add_(h.to(self.mm_dtype).mm(self.w_hh0))
            elif self.exact:
                torch.addmm(self.b_cat[layer - 1], self.xh[layer], self.w_cat[layer - 1], out=gates)
            else:
                gates.copy_(self.xh[layer].to(self.mm_dtype).mm(self.w_cat[layer - 1])).add_(self.b_cat[layer - 1])
            torch.sigmoid(gates[:, : 3 * hidden], out=act[:, : 3 * hidden])
            torch.tanh(gates[:, 3 * hidden :], out=act[:, 3 * hidden :])
            c = self.c[layer]
            c.mul_(act[:, hidden : 2 * hidden]).addcmul_(act[:, :hidden], act[:, 3 * hidden :])
            torch.tanh(c, out=self.tanh_c)
            torch.mul(act[:, 2 * hidden : 3 * hidden], self.tanh_c, out=h)  # new h_l, in place
            if layer + 1 < self.layers:
                self.xh[layer + 1][:, :hidden].copy_(h)
        top = self.xh[-1][:, hidden:]
        if self.exact:
            torch.addmm(self.b_head, top, self.w_head, out=self.logits)
        else:
            self.logits.copy_(top.to(self.mm_dtype).mm(self.w_head)).add_(self.b_head)

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed (N,) ids; returns the (N, V) logits of the next character (a reused buffer)."""
        self.ids.copy_(ids)
        if not self.use_graph:
            self._step()
            return self.logits
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        saved = [x.clone() for x in self.xh], self.c.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up kernels and workspaces outside the graph
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        for x, s in zip(self.xh, saved[0]):  # undo the warm-up steps' effect on the state
            x.copy_(s)
        self.c.copy_(saved[1])


def matmul_dtype(dtype: torch.dtype | None, num_streams: int, device: torch.device) -> torch.dtype:
    """The precision of the decoder's matmuls: the run's autocast dtype (bf16 where fast),
    except for fewer than 8 streams on a CPU, where fp32 is faster: bf16 matrix-vector
    products measured 321 us a step against 148 us for fp32 at 2x512 (2-core EPYC)."""
    if dtype is None or (device.type == "cpu" and num_streams < 8):
        return torch.float32
    return dtype

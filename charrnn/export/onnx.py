"""`charrnn export`: a trained model as one ONNX file, and `OnnxModel`, which runs one.

The ONNX graph is written here op by op (onnx.helper) rather than traced: tracing unrolls
the hand-written cells' loop over time, fixing T. It is a Scan over time whose body is one
step of the network, the same equations as the packed decoder (charrnn.infer.decode):

    inputs   ids (B, T) int64, h (L, B, H) [, c (L, B, H)]      B and T dynamic
    layer 0  x = table[id]          table = Emb W_ih0^T (+ LN_x) + b   (V, G), a Gather
    layer l  x = h_{l-1} W_ih^T (+ LN_x) + b;  r = h_l W_hh^T (+ LN_h) (+ b_hh for GRU)
    rnn      h = tanh(x + r)
    gru      r, z = sigma(x_rz + r_rz);  n = tanh(x_n + r * r_n);  h = n + z (h - n)
    lstm     i, f, C~, o = x + r (nn.LSTM's order), peepholes on i, f (C_{t-1}) and o (C_t),
             C = f C + i tanh(C~);  h = o tanh(C, or LN_c(C))
    head     logits = h_top W^T + b                                  -> logits (B, T, V)
    outputs  logits, h_out [, c_out]

metadata_props, each a JSON value: charrnn.vocabulary (the characters, id order),
charrnn.start_state ({"h": [L][H], "c": ...}: the learned state every fresh read starts
from, not zeros), charrnn.state_inputs, charrnn.model_config, charrnn.version,
charrnn.start_text (what a read with no prime starts from).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from charrnn.atomic import atomic_write
from charrnn.celltypes import CELL_TYPES
from charrnn.errors import UsageError, check_text
from charrnn.infer.decode import step_weights
from charrnn.version import __version__

OPSET = 17  # LayerNormalization


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise UsageError("charrnn export needs onnx: pip install 'charrnn[export]' (scripts/setup.sh does)") from None
    return onnx, TensorProto, helper, numpy_helper


def build_onnx(model) -> bytes:
    """The ONNX model (serialized) of a charrnn.infer.api.Model's network, with its metadata."""
    onnx, TensorProto, helper, numpy_helper = _onnx()
    network, vocab = model.network, model.vocab
    config = network.config
    cell, hidden, layers = config.cell, config.hidden_size, config.num_layers
    lstm = CELL_TYPES[cell].has_cell_state
    weights = step_weights(network)
    inits, body = [], []
    counter = [0]

    def const(name: str, tensor: torch.Tensor) -> str:
        inits.append(numpy_helper.from_array(tensor.detach().cpu().contiguous().numpy(), name))
        return name

    def op(kind: str, inputs: list[str], outputs: int | list[str] = 1, **attrs) -> list[str] | str:
        if isinstance(outputs, int):
            counter[0] += 1
            outputs = [f"{kind.lower()}_{counter[0]}_{k}" for k in range(outputs)]
        body.append(helper.make_node(kind, inputs, outputs, **attrs))
        return outputs if len(outputs) > 1 else outputs[0]

    def norm(x: str, layer: int, which: int) -> str:
        w, b, eps = weights[layer]["norms"][which]
        return op("LayerNormalization", [x, const(f"l{layer}_ln{which}_w", w), const(f"l{layer}_ln{which}_b", b)],
                  axis=-1, epsilon=float(eps))

    state_in = [f"h{l}_in" for l in range(layers)] + ([f"c{l}_in" for l in range(layers)] if lstm else [])
    state_out = [f"h{l}_out" for l in range(layers)] + ([f"c{l}_out" for l in range(layers)] if lstm else [])
    below = None
    for l, w in enumerate(weights):
        h_prev = f"h{l}_in"
        if l == 0:
            x = op("Gather", [const("table", w["table"]), "id_t"], axis=0)
        else:
            x = op("MatMul", [below, const(f"l{l}_w_ih", w["w_ih"].T)])
            if w["norms"] is not None:
                x = norm(x, l, 0)
            x = op("Add", [x, const(f"l{l}_in_bias", w["in_bias"])])
        r = op("MatMul", [h_prev, const(f"l{l}_w_hh", w["w_hh"].T)])
        if w["norms"] is not None:
            r = norm(r, l, 1)
        h_new = f"h{l}_out"
        if cell == "rnn":
            op("Tanh", [op("Add", [x, r])], [h_new])
        elif cell == "gru":
            r = op("Add", [r, const(f"l{l}_rec_bias", w["rec_bias"])])
            split = const(f"split_gru_{l}", torch.tensor([2 * hidden, hidden]))
            x_rz, x_n = op("Split", [x, split], 2, axis=1)
            r_rz, r_n = op("Split", [r, split], 2, axis=1)
            reset, update = op("Split", [op("Sigmoid", [op("Add", [x_rz, r_rz])]),
                                         const(f"split_rz_{l}", torch.tensor([hidden, hidden]))], 2, axis=1)
            n = op("Tanh", [op("Add", [x_n, op("Mul", [reset, r_n])])])
            op("Add", [n, op("Mul", [update, op("Sub", [h_prev, n])])], [h_new])
        else:
            c_prev, c_new = f"c{l}_in", f"c{l}_out"
            gates = op("Add", [x, r])
            i, f, g, o = op("Split", [gates, const(f"split4_{l}", torch.tensor([hidden] * 4))], 4, axis=1)
            peep = w["peepholes"]
            if peep is not None:
                i = op("Add", [i, op("Mul", [const(f"l{l}_p_i", peep[0]), c_prev])])
                f = op("Add", [f, op("Mul", [const(f"l{l}_p_f", peep[1]), c_prev])])
            i, f = op("Sigmoid", [i]), op("Sigmoid", [f])
            op("Add", [op("Mul", [f, c_prev]), op("Mul", [i, op("Tanh", [g])])], [c_new])
            if peep is not None:
                o = op("Add", [o, op("Mul", [const(f"l{l}_p_o", peep[2]), c_new])])
            o = op("Sigmoid", [o])
            shown = norm(c_new, l, 2) if w["norms"] is not None else c_new
            op("Mul", [o, op("Tanh", [shown])], [h_new])
        below = h_new
    head = op("MatMul", [below, const("head_w", network.head.weight.float().T)])
    op("Add", [head, const("head_b", network.head.bias.float())], ["logits_t"])

    B, V, H = "batch", len(vocab), hidden
    state_info = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [B, H])  # noqa: E731
    body_graph = helper.make_graph(
        body, "step", [*map(state_info, state_in), helper.make_tensor_value_info("id_t", TensorProto.INT64, [B])],
        [*map(state_info, state_out), helper.make_tensor_value_info("logits_t", TensorProto.FLOAT, [B, V])])

    # The main graph: split (L, B, H) states into layers, Scan over time, stack back.
    main = []
    names = ["h", "c"] if lstm else ["h"]
    scan_in = []
    for name in names:
        parts = [f"{name}{l}_start" for l in range(layers)]
        if layers == 1:
            main.append(helper.make_node("Squeeze", [name, "axis0"], parts))
        else:
            split = [f"{name}_split{l}" for l in range(layers)]
            main.append(helper.make_node("Split", [name, "ones"], split, axis=0))
            main += [helper.make_node("Squeeze", [s, "axis0"], [p]) for s, p in zip(split, parts)]
        scan_in += parts
    scan_out_states = [f"{s}_final" for s in state_out]
    main.append(helper.make_node("Scan", [*scan_in, "ids"], [*scan_out_states, "logits"], body=body_graph,
                                 num_scan_inputs=1, scan_input_axes=[1], scan_output_axes=[1]))
    outputs = []
    for k, name in enumerate(names):
        finals = scan_out_states[k * layers : (k + 1) * layers]
        unsq = [f"{f}_u" for f in finals]
        main += [helper.make_node("Unsqueeze", [f, "axis0"], [u]) for f, u in zip(finals, unsq)]
        main.append(helper.make_node("Concat", unsq, [f"{name}_out"], axis=0))
        outputs.append(f"{name}_out")
    main_inits = [numpy_helper.from_array(torch.tensor([0]).numpy(), "axis0"),
                  numpy_helper.from_array(torch.ones(layers, dtype=torch.long).numpy(), "ones")]
    graph = helper.make_graph(
        main, "charrnn", [helper.make_tensor_value_info("ids", TensorProto.INT64, [B, "time"]),
                          *[helper.make_tensor_value_info(n, TensorProto.FLOAT, [layers, B, H]) for n in names]],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [B, "time", V]),
         *[helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, [layers, B, H]) for n in names]],
        initializer=inits + main_inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="charrnn",
                              producer_version=__version__)
    proto.ir_version = min(proto.ir_version, 8)  # readable by older runtimes too
    start = network.start_state.detach().float()  # (S, L, H)
    helper.set_model_props(proto, {
        "charrnn.vocabulary": json.dumps(list(vocab.chars), ensure_ascii=False),
        "charrnn.start_state": json.dumps({name: start[k].tolist() for k, name in enumerate(names)}),
        "charrnn.state_inputs": json.dumps(names),
        "charrnn.start_text": json.dumps("\n" if "\n" in vocab.chars else vocab.chars[0]),
        "charrnn.model_config": json.dumps(config.__dict__),
        "charrnn.version": json.dumps(__version__),
        "charrnn.source": json.dumps(str(model.path)),
    })
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_onnx(model, target: Path) -> int:
    """Write the ONNX file atomically; its size in bytes."""
    data = build_onnx(model)
    atomic_write(Path(target), lambda f: f.write(data))
    shareable(Path(target))
    return len(data)


def shareable(path: Path) -> None:
    """Files to hand on get the usual mode (0644 under umask 022), not the atomic
    writer's private 0600: a page is made to be put on a web server."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


class OnnxModel:
    """An exported .onnx file run by onnxruntime, with nothing of charrnn's network code:
    the vocabulary and start state come from the file's metadata (`charrnn sample --onnx`)."""

    def __init__(self, path: Path):
        try:
            import numpy as np
            import onnxruntime
        except ImportError:
            raise UsageError("--onnx needs onnxruntime: pip install 'charrnn[export]' (scripts/setup.sh does)") from None
        from charrnn.errors import CheckpointError

        self.np = np
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
            self.vocabulary = json.loads(meta["charrnn.vocabulary"])
            self.start = {k: np.array(v, dtype=np.float32) for k, v in json.loads(meta["charrnn.start_state"]).items()}
            self.start_text = json.loads(meta["charrnn.start_text"])
        except FileNotFoundError:
            raise CheckpointError(f"{path} does not exist") from None
        except Exception as err:  # onnxruntime's own errors, or a file charrnn did not write
            raise CheckpointError(f"{path} is not a charrnn ONNX export ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:160]})") from None
        self.index = {ch: k for k, ch in enumerate(self.vocabulary)}

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        check_text(text, "prime")
        missing = sorted({ch for ch in text if ch not in self.index})
        if missing and unknown != "skip":
            from charrnn.errors import DataError

            raise DataError(f"character(s) unknown to the model: {', '.join(map(repr, missing))}; "
                            "use --unknown skip to drop them")
        return [self.index[ch] for ch in text if ch in self.index]

    def run(self, ids: list[list[int]], state: dict | None):
        """logits (B, T, V) and the state after ids (B, T); state None: the start state."""
        np = self.np
        batch = len(ids)
        if state is None:
            state = {k: np.repeat(v[:, None, :], batch, axis=1) for k, v in self.start.items()}
        outputs = self.session.run(None, {"ids": np.array(ids, dtype=np.int64), **state})
        return outputs[0], dict(zip(self.start, outputs[1:]))

    def stream(self, prime_ids: list[int], length: int, temperature: float, seed: int, stop: str = ""):
        """Yield new characters: charrnn's sampler (temperature, an inverse-CDF draw) with
        numpy's generator, so the same seed gives the same text, not PyTorch's text."""
        np = self.np
        rng = np.random.default_rng(seed)
        logits, state = self.run([prime_ids or [self.index[self.start_text]]], None)
        tail = ""
        for _ in range(length):
            row = logits[0, -1].astype(np.float64)
            if temperature == 0:
                k = int(row.argmax())
            else:
                p = np.exp((row - row.max()) / temperature)
                cdf = np.cumsum(p)
                k = min(int((cdf < rng.random() * cdf[-1]).sum()), len(row) - 1)
            yield self.vocabulary[k]
            if stop:
                tail = (tail + self.vocabulary[k])[-len(stop):]
                if tail == stop:
                    return
            logits, state = self.run([[k]], state)

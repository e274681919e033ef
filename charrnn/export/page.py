"""`charrnn export --page`: a trained model as one web page that writes offline, the same
step as the ONNX graph (charrnn.export.onnx) in JavaScript, its products in a WebAssembly
SIMD kernel (web/matvec.wat) where the browser has one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from charrnn.celltypes import CELL_TYPES
from charrnn.errors import UsageError
from charrnn.export.onnx import shareable
from charrnn.infer.decode import step_weights
from charrnn.version import __version__


def build_page(model, dtype: str = "float16") -> str:
    """One self-contained HTML page that samples the model in the browser (no server, no
    network, from file:// too): the weights inline (base64, float16 or float32), a
    JavaScript step of the network, the page's controls and window.charrnn's API."""
    import base64
    from importlib import resources

    if dtype not in ("float16", "float32"):
        raise UsageError(f"--weights must be fp16 or fp32, not {dtype}")
    network, vocab = model.network, model.vocab
    config = network.config
    names = ["h", "c"] if CELL_TYPES[config.cell].has_cell_state else ["h"]
    blob, at = [], [0]

    def put(tensor):
        if tensor is None:
            return None
        array = tensor.detach().float().contiguous().cpu().to(torch.float16 if dtype == "float16" else torch.float32)
        raw = array.view(torch.int16 if dtype == "float16" else torch.int32).numpy().tobytes()
        entry = [at[0], array.numel()]
        blob.append(raw)
        at[0] += len(raw)
        return entry

    layers = []
    for w in step_weights(network):
        layers.append({"table": put(w.get("table")), "w_ih": None if "table" in w else put(w["w_ih"]),
                       "w_hh": put(w["w_hh"]), "in_bias": put(w["in_bias"]), "rec_bias": put(w["rec_bias"]),
                       "norms": [{"w": put(nw), "b": put(nb), "eps": eps} for nw, nb, eps in w["norms"]]
                       if w["norms"] else None,
                       "peepholes": [put(p) for p in w["peepholes"]] if w["peepholes"] else None})
    start = network.start_state.detach().float()
    parameters = sum(p.numel() for p in network.parameters())
    spec = {
        "config": config.__dict__, "vocabulary": vocab.chars, "state_inputs": names, "dtype": dtype,
        "start_state": {name: start[k].tolist() for k, name in enumerate(names)},
        "start_text": "\n" if "\n" in vocab.chars else vocab.chars[0],
        "layers": layers, "head_w": put(network.head.weight), "head_b": put(network.head.bias),
        "card": f"{config.num_layers}x{config.hidden_size} {config.cell}, {parameters / 1e6:.2f}M parameters, "
                f"{len(vocab)} characters, trained on {model.corpus.get('name', '?')} for {model.step} steps; "
                f"{'float16' if dtype == 'float16' else 'float32'} weights; charrnn {__version__}",
        "weights": base64.b64encode(b"".join(blob)).decode("ascii"),
    }
    page = resources.files("charrnn.export").joinpath("webpage.html").read_text(encoding="utf-8")
    wasm = resources.files("charrnn.export").joinpath("web/matvec.wasm.b64").read_text(encoding="ascii").strip()
    # JSON inside <script>: "</" cannot end the element early once written as "<\/".
    data = json.dumps(spec, ensure_ascii=True).replace("</", "<\\/")
    return (page.replace("MODEL_TITLE", model.path.parent.name).replace("WASM_BASE64", wasm)
            .replace("MODEL_JSON", data))


def export_page(model, target: Path, dtype: str = "float16") -> int:
    from charrnn.atomic import write_text

    page = build_page(model, dtype)
    write_text(Path(target), page)
    shareable(Path(target))
    return len(page.encode("utf-8"))

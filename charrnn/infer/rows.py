"""Row products whose bits do not depend on the batch: what lets `charrnn serve` decode one
client at one-stream speed and still write the same text for a request alone or among 63
others.

    packed = Packed(w)                      # w (K, N) fp32 on the CPU: panels packed once
    product(x, packed, out, init=None)      # out = init + x @ w, each row summed in k order

BLAS picks its kernel by the number of rows (on the CPUs measured, MKL: a matrix-vector
path for 1-3 rows, FMA-blocked sgemm from 4), so a row's last bits change with the batch;
the server used to pad to 4 rows to stay on one kernel, at 2-3x the one-row cost. The C
kernel (`_rows.c`, built by setup.py as the optional extension charrnn.infer._rows) computes
every output as the same sequence -- init, then + x[k] * w[k] for k in order, each
product rounded before its add -- for every number of rows and any split between
threads, at 0.6-0.8x MKL's time for 1-16 rows and about 1.05x at 64 (docs/benchmarks.md,
"Serve"). That sequence is also what MKL's matrix-vector path computes on those CPUs,
so the server's rows equal `charrnn sample`'s one-stream rows bit for bit there.

tests/test_rows.py checks the kernel against that sequence written in torch (bit for
bit), at every row count and thread split. Without the extension (no C compiler at
install) `available()` is False and the decoder keeps torch's matmul.
"""

from __future__ import annotations

import ctypes
import importlib.util
from concurrent.futures import ThreadPoolExecutor

import torch

PANEL = 64  # columns a panel (PW in _rows.c)
SPLIT_ROWS = 16  # from this many rows up, two threads share a product's panels

_lib = None
_helper: ThreadPoolExecutor | None = None


def _load():
    global _lib
    if _lib is None:
        spec = importlib.util.find_spec("charrnn.infer._rows")
        if spec is None or spec.origin is None:
            _lib = False
        else:
            lib = ctypes.CDLL(spec.origin)
            f = lib.charrnn_rows
            p, n = ctypes.c_void_p, ctypes.c_longlong
            f.argtypes = [p, n, p, p, n, p, n, p, n, n, n, n, n, n, ctypes.c_int]
            f.restype = None
            _lib = f
    return _lib


def available() -> bool:
    """Whether the compiled kernel is installed."""
    return bool(_load())


class Packed:
    """A (K, N) fp32 weight with its full panels of PANEL columns packed (N // PANEL, K, PANEL)."""

    def __init__(self, w: torch.Tensor):
        if w.dtype != torch.float32 or w.device.type != "cpu" or w.dim() != 2:
            raise ValueError("rows.Packed takes a 2-d float32 CPU tensor")
        self.w = w.contiguous()
        self.k, self.n = self.w.shape
        full = self.n // PANEL
        self.panels = self.w[:, : full * PANEL].reshape(self.k, full, PANEL).permute(1, 0, 2).contiguous()
        self.count = full


def product(x: torch.Tensor, packed: Packed, out: torch.Tensor, init: torch.Tensor | None = None,
            threads: int = 1) -> torch.Tensor:
    """out = init + x @ packed.w (init None: zeros; init may be out itself), rows (M, K) of
    x with unit column stride. With threads > 1 and at least SPLIT_ROWS rows, a second
    thread takes half the panels: the bits are the same either way."""
    bind(x, packed, out, init)(threads)
    return out


class bind:
    """product(x, packed, out, init) checked once, for buffers that stay put (a decoder's):
    calling it (with the thread count) runs the product again on whatever they hold now."""

    def __init__(self, x: torch.Tensor, packed: Packed, out: torch.Tensor, init: torch.Tensor | None = None):
        self.f = _load()
        if not self.f:
            raise RuntimeError("charrnn.infer._rows is not built (reinstall charrnn with a C compiler present)")
        rows, k = x.shape
        if k != packed.k or out.shape != (rows, packed.n) or (init is not None and init.shape != out.shape):
            raise ValueError(f"shapes: x {tuple(x.shape)}, w {(packed.k, packed.n)}, out {tuple(out.shape)}")
        for t in (x, out) if init is None else (x, out, init):
            if t.dtype != torch.float32 or t.stride(-1) != 1 or t.device.type != "cpu":
                raise ValueError("rows.product takes float32 CPU tensors with unit column stride")
        self.keep = (x, packed, out, init)  # the memory the pointers point into
        self.args = (x.data_ptr(), x.stride(0), packed.panels.data_ptr(), packed.w.data_ptr(), packed.n,
                     0 if init is None else init.data_ptr(), 0 if init is None else init.stride(0),
                     out.data_ptr(), out.stride(0), rows, k, packed.n)
        self.count = packed.count
        self.split = rows >= SPLIT_ROWS and packed.count >= 2

    def __call__(self, threads: int = 1) -> None:
        if threads > 1 and self.split:
            half = self.count // 2
            other = helper().submit(self.f, *self.args, half, self.count, 1)  # ctypes lets go of the GIL
            self.f(*self.args, 0, half, 0)
            other.result()
        else:
            self.f(*self.args, 0, self.count, 1)


def helper() -> ThreadPoolExecutor:
    """The one helper thread of this process's two-thread products and decoder lanes."""
    global _helper
    if _helper is None:
        _helper = ThreadPoolExecutor(1, thread_name_prefix="charrnn-rows")
    return _helper

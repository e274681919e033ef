"""The row kernel (charrnn/infer/_rows.c via charrnn.infer.rows): every output is init + x[k] * w[k]
summed in k order, each product rounded before its add, whatever the number of rows, the
block a row falls in, or the split between threads -- so a served stream's bits do not
depend on what else is being served. Checked bit for bit against that sequence written
with torch's elementwise ops (fp32 throughout)."""

import os
import shutil
import sysconfig

import pytest
import torch

from charrnn.infer import rows

needs_kernel = pytest.mark.skipif(not rows.available(), reason="charrnn.infer._rows is not built (no C compiler at install)")


def in_order(x: torch.Tensor, w: torch.Tensor, init: torch.Tensor | None) -> torch.Tensor:
    """The kernel's promise, one elementwise product and one add per k (fp32)."""
    acc = torch.zeros(len(x), w.shape[1]) if init is None else init.clone()
    for k in range(w.shape[0]):
        acc = acc + x[:, k : k + 1] * w[k]
    return acc


def test_the_kernel_is_built_wherever_it_can_be():
    """Where a C compiler and Python's headers are present (as on CI), the optional
    extension must have been built: a silent build failure would quietly bring back the
    4-row server."""
    headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    if not (headers and (shutil.which("cc") or shutil.which("gcc"))):
        pytest.skip("no C compiler or no Python headers here: the kernel is optional")
    assert rows.available()


@needs_kernel
@pytest.mark.parametrize("k, n", [(37, 200), (24, 64), (5, 3), (96, 1536 // 8)])
def test_every_row_count_gives_the_in_order_sums_bit_for_bit(k, n):
    """fp32. 200 columns = 3 packed panels and 8 summed one at a time; 1 to 9 rows (blocks
    of 4 and the rows left over), 16 and 33; zeros, a bias row and a full init."""
    torch.manual_seed(k * n)
    w = torch.randn(k, n)
    packed = rows.Packed(w)
    x_all, init_all = torch.randn(33, k), torch.randn(33, n)
    for m in [*range(1, 10), 16, 33]:
        x = x_all[:m]
        for init in (None, init_all[:m], init_all[0].expand(m, -1)):
            out = torch.empty(m, n)
            rows.product(x, packed, out, init)
            assert torch.equal(out, in_order(x, w, init)), (m, init is None)
            assert torch.allclose(out, (0 if init is None else init) + x @ w, atol=1e-4)


@needs_kernel
def test_a_row_is_the_same_bits_alone_among_others_and_split_between_threads():
    torch.manual_seed(0)
    w = torch.randn(48, 1536)
    packed = rows.Packed(w)
    x = torch.randn(64, 48)
    together = rows.product(x, packed, torch.empty(64, 1536))
    split = rows.product(x, packed, torch.empty(64, 1536), threads=2)
    assert torch.equal(together, split)
    for i in (0, 5, 63):
        alone = rows.product(x[i : i + 1], packed, torch.empty(1, 1536))
        assert torch.equal(alone[0], together[i])


@needs_kernel
def test_strided_rows_and_accumulating_in_place():
    """A decoder hands it views: h is the right half of [h_{l-1}, h_l] (row stride 2H), and
    layer 0 accumulates onto its gates (init is out)."""
    torch.manual_seed(1)
    xh, w = torch.randn(6, 2 * 40), torch.randn(40, 160)
    h = xh[:, 40:]
    gates = torch.randn(6, 160)
    expected = in_order(h.contiguous(), w, gates)
    rows.product(h, rows.Packed(w), gates, gates)
    assert torch.equal(gates, expected)


@needs_kernel
def test_bad_operands_are_refused():
    packed = rows.Packed(torch.randn(8, 70))
    with pytest.raises(ValueError, match="shapes"):
        rows.product(torch.randn(2, 9), packed, torch.empty(2, 70))
    with pytest.raises(ValueError, match="unit column stride"):
        rows.product(torch.randn(8, 2).T, packed, torch.empty(2, 70))
    with pytest.raises(ValueError, match="float32"):
        rows.Packed(torch.randn(8, 70, dtype=torch.float64))

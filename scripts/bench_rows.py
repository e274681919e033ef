"""The row kernel (charrnn/infer/_rows.c) against torch's matmul, one thread, same process:
time per product out = init + x @ w for M rows, and whether each row's bits equal the
one-row result (the property the server needs).

    python scripts/bench_rows.py [--shapes 768x1536,384x1536,384x65] [--rows 1,2,4,8,16,32,64]
"""

from __future__ import annotations

import argparse
import time

import torch

from charrnn.infer import rows


def seconds(fn, reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - started) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="768x1536,384x1536,384x65", help="KxN weights")
    parser.add_argument("--rows", default="1,2,3,4,8,16,32,64")
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    if not rows.available():
        raise SystemExit("charrnn.infer._rows is not built (reinstall charrnn with a C compiler present)")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("K x N | rows | torch us | kernel us | kernel / torch | torch rows = 1-row bits | kernel rows = 1-row bits")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        w = torch.randn(k, n) * 0.05
        packed = rows.Packed(w)
        for m in (int(v) for v in args.rows.split(",")):
            x, init, out = torch.randn(m, k), torch.randn(m, n), torch.empty(m, n)
            torch_time = seconds(lambda: torch.addmm(init, x, w), args.reps)
            bound = rows.bind(x, packed, out, init)
            kernel_time = seconds(bound, args.reps)
            ours = out.clone()
            theirs = torch.addmm(init, x, w)
            torch_same = all(torch.equal(theirs[i], torch.addmm(init[i : i + 1], x[i : i + 1], w)[0]) for i in range(m))
            kernel_same = all(torch.equal(ours[i], rows.product(x[i : i + 1], packed, torch.empty(1, n), init[i : i + 1])[0])
                              for i in range(m))
            print(f"{k} x {n} | {m} | {torch_time * 1e6:,.0f} | {kernel_time * 1e6:,.0f} | "
                  f"{kernel_time / torch_time:.2f} | {'yes' if torch_same else 'no'} | {'yes' if kernel_same else 'no'}")


if __name__ == "__main__":
    main()

"""The exported page's speed and the cost of its fp16 weights, beside `charrnn sample`.

    python scripts/bench_web.py RUN [--chars 5000] [--loss-chars 20000] [--json]

Exports RUN as a page with fp32 and with fp16 weights and, in headless Chromium on this
machine, measures one stream's characters per second (WebAssembly SIMD, and the plain
JavaScript fallback) against model.generate with one stream in this process (charrnn's
fast 1-stream decoder, what `charrnn sample` runs), best of 3. Then each page reads the
first --loss-chars characters of the run's validation split as one stream from the start
state, as `charrnn eval --streams 1` does without the start mix, and reports its loss:
the fp16 page's cost is its loss minus the fp32 page's. Sizes are against the fp32
weights (4 bytes a parameter). Run it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import charrnn  # noqa: E402
from browser import Browser  # noqa: E402
from charrnn.export.page import export_page  # noqa: E402
from charrnn.infer.sample import SampleSettings  # noqa: E402

SPEED = """(() => {{ const t0 = performance.now();
    charrnn.generate({{prime: 'ROMEO:', length: {chars}, temperature: 0.8, seed: 2}});
    return {chars} / ((performance.now() - t0) / 1000); }})()"""
LOSS = """(() => {{ const text = {text}; charrnn.reset(); let total = 0, n = 0;
    const chars = Array.from(text);
    charrnn.feed(chars[0]);
    for (let k = 1; k < chars.length; k++) {{ total -= Math.log(charrnn.probabilities()[chars[k]]); n++; charrnn.feed(chars[k]); }}
    return total / n; }})()"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--chars", type=int, default=5000)
    parser.add_argument("--loss-chars", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = charrnn.load(args.run, device="cpu")
    parameters = sum(p.numel() for p in model.network.parameters())
    ids, _ = model.vocab.encode("ROMEO:")
    best = 0.0
    for seed in range(3):
        started = time.perf_counter()
        for _ in model.generate(ids, SampleSettings(length=args.chars, temperature=0.8), 1, seed=seed, dtype="fp32"):
            pass
        best = max(best, args.chars / (time.perf_counter() - started))
    report = {"model": repr(model), "parameters": parameters, "fp32_weights_mb": 4 * parameters / 1e6,
              "charrnn_sample_chars_per_s": best}
    val_ids, _ = model.validation_ids()
    text = model.vocab.decode(val_ids[: args.loss_chars])
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            page = Path(tmp) / f"{dtype}.html"
            size = export_page(model, page, dtype)
            row = {"page_mb": size / 1e6, "page_over_fp32_weights": size / (4 * parameters)}
            with Browser(Path(tmp) / f"profile-{dtype}") as browser:
                for runtime in ("wasm-simd", "javascript"):
                    browser.open(page.as_uri() + ("?runtime=javascript" if runtime == "javascript" else ""))
                    browser.wait("document.body.dataset.ready === '1'")
                    assert browser.js("charrnn.runtime") == runtime
                    browser.js(SPEED.format(chars=500))  # warm the JIT
                    row[f"{runtime}_chars_per_s"] = max(browser.js(SPEED.format(chars=args.chars), timeout=300)
                                                        for _ in range(3))
                row["validation_loss"] = browser.js(LOSS.format(text=json.dumps(text)), timeout=600)
            report[dtype] = row
    with torch.no_grad():  # the same read in PyTorch, as a check on the fp32 page
        x = val_ids[: args.loss_chars].long()[None]
        logits, _ = model.network(x)
        report["pytorch_validation_loss"] = float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:]))
    report["fp16_loss_cost"] = report["float16"]["validation_loss"] - report["float32"]["validation_loss"]
    report["browser_over_charrnn_sample"] = report["float16"]["wasm-simd_chars_per_s"] / best
    print(json.dumps(report, indent=None if args.json else 1))


if __name__ == "__main__":
    main()

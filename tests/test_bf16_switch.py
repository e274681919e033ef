"""The serve, sample, eval, export and API tests again, with the bf16-host switch
(CHARRNN_CPU_BF16) flipped from what this CPU decides: on a CPU without AVX512_BF16 they
run `--dtype auto` as a bf16 host does (the decoder, the engine, sampling, scoring and
export in bf16; nn.LSTM paths in bf16 where oneDNN can run them, else fp32 as
device.resolve_dtype says), and on a bf16 CPU as a CPU without it does. So a break that
only one kind of CPU would see fails CI on the machines we have. CPU."""

import os
import subprocess
import sys

from conftest import ROOT

from charrnn.device import cpu_has_fast_bf16

FILES = ["tests/test_serve.py", "tests/test_sample.py", "tests/test_evaluate.py", "tests/test_export.py",
         "tests/test_api.py", "tests/test_text_doors.py", "tests/test_chat.py"]


def test_serve_sample_eval_export_and_api_pass_with_the_bf16_host_switch_flipped():
    native = os.environ.get("CHARRNN_CPU_BF16", "").strip()
    env = {k: v for k, v in os.environ.items() if k != "CHARRNN_CPU_BF16"}
    flipped = "1" if native == "0" else "0" if native == "1" else ("0" if cpu_has_fast_bf16() else "1")
    env.update(CHARRNN_CPU_BF16=flipped, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, f"CHARRNN_CPU_BF16={flipped}: {summary}\n{done.stdout[-6000:]}"
    assert " passed" in summary and "failed" not in summary

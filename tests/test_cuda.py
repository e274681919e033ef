"""GPU checks (cuDNN LSTM, CUDA graphs, bf16 autocast); skipped where no CUDA GPU is present.

Run on a GPU machine with: bash scripts/gpu_check.sh
"""

import pytest
import torch
from conftest import VERSE, corpus_of, tiny_configs

from charrnn.config import ModelConfig
from charrnn.data.text import Vocab
from charrnn.device import resolve_device, resolve_dtype
from charrnn.infer.evaluate import evaluate
from charrnn.infer.sample import SampleSettings, generate
from charrnn.model.network import CharRNN
from charrnn.store import checkpoint
from charrnn.training.run import trainer_for

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")]


def test_auto_picks_cuda_and_bf16():
    device, _ = resolve_device("auto")
    assert device.type == "cuda"
    dtype, _ = resolve_dtype("auto", device)
    assert dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole", "layernorm"])
def test_cuda_training_checkpoint_loads_on_cpu(tmp_path, cell):
    model_config, train_config = tiny_configs(model={"cell": cell}, train={"device": "cuda", "dtype": "auto"})
    summary = trainer_for(corpus_of(VERSE * 20), model_config, train_config, tmp_path / "run").run()
    assert summary["val_loss"] < 4.0
    payload = checkpoint.load(tmp_path / "run" / "last.pt")
    model, vocab = checkpoint.restore_model(payload)
    assert next(model.parameters()).device.type == "cpu"
    ids, _ = vocab.encode(VERSE)
    cpu = evaluate(model, ids, torch.device("cpu")).loss
    gpu = evaluate(model.cuda(), ids, torch.device("cuda")).loss
    assert gpu == pytest.approx(cpu, abs=1e-3)


@pytest.mark.parametrize("streams", [1, 16])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole", "layernorm"])
def test_cuda_graph_decoder_equals_reference(streams, cell):
    vocab = Vocab.from_text(VERSE)
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(cell=cell, hidden_size=64, num_layers=2, dropout=0.0), len(vocab)).cuda().eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    prime, _ = vocab.encode("The ")

    def run(fast):
        gen = torch.Generator("cuda").manual_seed(3)
        steps = generate(model, vocab, prime, SampleSettings(length=200, temperature=0.0), streams, gen, "cuda", fast=fast)
        return ["".join(c) for c in zip(*steps)]

    assert run(True) == run(False)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole", "layernorm"])
def test_viz_trace_on_cuda_equals_cpu(cell):
    from charrnn.viz import analysis

    torch.manual_seed(0)
    model = CharRNN(ModelConfig(cell=cell, hidden_size=32, num_layers=2, embedding_size=16, dropout=0.0), 30)
    ids = torch.randint(0, 30, (200,)).tolist()
    cpu = analysis.trace(model, ids)
    gpu = analysis.trace(model.cuda(), ids)
    torch.testing.assert_close(gpu.loss, cpu.loss, atol=1e-4, rtol=1e-4, equal_nan=True)
    for a, b in zip(gpu.activations, cpu.activations):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_the_start_mix_on_cuda_samples_as_on_cpu():
    """The k-gram lives on the CPU and its log-probabilities move to the logits' device:
    greedy samples with the mix agree between the CUDA-graph decoder, the reference path
    and the CPU, and differ from the network alone."""
    from charrnn.model.startmix import POSITIONS, StartMix

    vocab = Vocab.from_text(VERSE)
    ids, _ = vocab.encode(VERSE * 5)
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(hidden_size=64, num_layers=2, dropout=0.0), len(vocab)).eval()
    prior = StartMix.build(ids, len(vocab))
    prior.weights = torch.full((POSITIONS,), 0.9)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    prime, _ = vocab.encode("Th")
    settings = SampleSettings(length=30, temperature=0.0)

    def run(device, fast, prior=prior):
        return "".join(c[0] for c in generate(model.to(device), vocab, prime, settings, 1, None, device, fast=fast,
                                              prior=prior))

    cpu = run("cpu", False)
    assert run("cuda", True) == run("cuda", False) == cpu
    assert run("cpu", False, None)[:8] != cpu[:8]


def test_the_serving_engine_on_cuda_gives_each_request_the_same_text_alone_and_in_a_crowd(trained_run):
    import charrnn
    from charrnn.serve.engine import Engine
    from charrnn.serve.sequence import Request

    model = charrnn.load(trained_run, device="cuda")
    ids, _ = model.vocab.encode("The ")

    def run(count):
        engine = Engine(model)
        sequences = [engine.submit(Request(prompt_ids=ids, length=120, temperature=0.9, seed=k, n=1 + k % 2))
                     for k in range(count)]
        while not all(s.finished for s in sequences):
            engine.step()
        assert engine.active_streams == 0
        return ["".join(e[2] for e in s.events if e[0] == "text" and e[1] == 0) for s in sequences]

    alone, crowd = run(1), run(24)
    assert len(alone[0]) == 120 and crowd[0] == alone[0]


def test_an_onnx_export_of_a_cuda_model_matches_it(trained_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import charrnn
    from charrnn.export.onnx import build_onnx

    model = charrnn.load(trained_run, device="cuda")
    session = ort.InferenceSession(build_onnx(model), providers=["CPUExecutionProvider"])
    x = model.vocab.encode(VERSE)[0].long()[None]
    with torch.no_grad():
        logits, _ = model.network(x.cuda())
    state = {name: s.detach().cpu().numpy() for name, s in zip(["h", "c"], model.network.init_state(1))}
    out = session.run(None, {"ids": x.numpy(), **state})
    assert abs(out[0] - logits.float().cpu().numpy()).max() < 1e-3  # cuDNN's TF32 aside, the same network


def test_a_corpus_too_large_for_the_gpu_trains_from_host_mapped_ids_as_from_device_ids(tmp_path, monkeypatch):
    """A corpus over run.DEVICE_IDS_MAX stays mapped on the host and each batch is copied to
    the GPU: the same losses and weights as the ids on the GPU (fp32, stateful and stateless)."""
    from charrnn.training import run

    for stateless in (False, True):
        model_config, train_config = tiny_configs(train={"device": "cuda", "dtype": "fp32", "stateless": stateless})
        on_device = trainer_for(corpus_of(VERSE * 20), model_config, train_config, tmp_path / f"a{stateless}")
        assert on_device.plan.train_ids.device.type == "cuda"
        on_device.run()
        monkeypatch.setattr(run, "DEVICE_IDS_MAX", 0)
        on_host = trainer_for(corpus_of(VERSE * 20), model_config, train_config, tmp_path / f"b{stateless}")
        assert on_host.plan.train_ids.device.type == "cpu"
        on_host.run()
        monkeypatch.undo()
        a = checkpoint.load(tmp_path / f"a{stateless}" / "last.pt")
        b = checkpoint.load(tmp_path / f"b{stateless}" / "last.pt")
        # The same batches; CUDA's embedding backward adds in no fixed order, hence the tolerance.
        assert a.progress["best_val_loss"] == pytest.approx(b.progress["best_val_loss"], abs=1e-4)
        for key in a.model:
            torch.testing.assert_close(a.model[key], b.model[key], rtol=0, atol=1e-4, msg=key)

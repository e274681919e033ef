"""The packed step decoders: the same text and logits as the network's own forward."""

import pytest
import torch
from conftest import CELLS, VERSE, make_model, shaken

from charrnn.config import ModelConfig
from charrnn.data.text import Vocab
from charrnn.infer.sample import SampleSettings, generate
from charrnn.model.network import CharRNN


@pytest.mark.parametrize("settings", [
    dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.2, top_p=0.9), dict(temperature=0.0),
])
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_fast_decoder_samples_the_same_text_as_the_reference_path(settings, layers, cell):
    vocab = Vocab.from_text(VERSE)
    torch.manual_seed(5)
    config = ModelConfig(cell=cell, hidden_size=32, num_layers=layers, embedding_size=8, dropout=0.0)
    model = shaken(CharRNN(config, len(vocab)).eval())
    prime, _ = vocab.encode("Voilà ")

    def run(fast):
        gen = torch.Generator().manual_seed(11)
        steps = generate(model, vocab, prime, SampleSettings(length=300, **settings), num_samples=3,
                         generator=gen, fast=fast)
        return ["".join(c) for c in zip(*steps)]

    assert run(fast=True) == run(fast=False)


@pytest.mark.parametrize("cell", CELLS)
def test_fast_decoder_logits_match_forward(cell):
    from charrnn.infer.decode import make_decoder

    model = shaken(make_model(cell, vocab_size=20))
    ids = torch.randint(0, 20, (4, 12))
    expected, _ = model(ids)
    _, state = model(ids[:, :1])
    decoder = make_decoder(model, 4)
    decoder.load_state(state)
    for t in range(1, 12):
        logits = decoder.step(ids[:, t])
        torch.testing.assert_close(logits, expected[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_bf16_decoder_for_many_streams_stays_close_to_fp32(cell):
    from charrnn.infer.decode import make_decoder, matmul_dtype

    assert matmul_dtype(torch.bfloat16, 1, torch.device("cpu")) == torch.float32  # GEMV: fp32 is faster
    assert matmul_dtype(torch.bfloat16, 64, torch.device("cpu")) == torch.bfloat16
    model = make_model(cell, vocab_size=20)
    ids = torch.randint(0, 20, (16, 10))
    expected, _ = model(ids)
    _, state = model(ids[:, :1])
    decoder = make_decoder(model, 16, dtype=torch.bfloat16)
    assert decoder.w_head.dtype == torch.bfloat16
    decoder.load_state(state)
    for t in range(1, 10):
        torch.testing.assert_close(decoder.step(ids[:, t]), expected[:, t], rtol=0, atol=0.05)

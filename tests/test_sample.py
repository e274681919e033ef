"""Sampling: temperature, top-k / top-p, seeds, stop strings, the draws' distribution."""

import pytest
import torch
from conftest import VERSE, make_model

from charrnn.data.text import Vocab
from charrnn.infer.sample import SampleSettings, generate, next_ids


def _sample(model, vocab, seed, **kw):
    gen = torch.Generator().manual_seed(seed)
    settings = SampleSettings(**{"length": 60, "temperature": 1.0, **kw})
    prime, _ = vocab.encode("The ")
    return ["".join(c) for c in zip(*generate(model, vocab, prime, settings, num_samples=2, generator=gen))]


def test_greedy_is_argmax():
    logits = torch.randn(5, 30)
    assert torch.equal(next_ids(logits, SampleSettings(temperature=0), None), logits.argmax(-1))


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    top2 = next_ids(logits, SampleSettings(temperature=1.0, top_k=2), gen)
    assert set(top2.tolist()) == {0, 1}
    # p(0) ~ 0.72, p(1) ~ 0.27: top_p 0.5 keeps only the first.
    assert set(next_ids(logits, SampleSettings(temperature=1.0, top_p=0.5), gen).tolist()) == {0}
    assert set(next_ids(logits, SampleSettings(temperature=1.0, top_p=0.9), gen).tolist()) == {0, 1}


def test_seeded_sampling_is_reproducible():
    vocab = Vocab.from_text(VERSE)
    model = make_model(vocab_size=len(vocab))
    assert _sample(model, vocab, 7) == _sample(model, vocab, 7)
    assert _sample(model, vocab, 7) != _sample(model, vocab, 8)


def test_sampling_follows_model_distribution_step_by_step():
    """The generated ids equal a hand-run loop over model.forward with the same generator."""
    vocab = Vocab.from_text(VERSE)
    model = make_model(vocab_size=len(vocab))
    text = _sample(model, vocab, 3, length=30)[0]
    gen = torch.Generator().manual_seed(3)
    prime, _ = vocab.encode("The ")
    logits, state = model(prime.long()[None].expand(2, -1))
    out = []
    for _ in range(30):
        cdf = torch.softmax(logits[:, -1].float(), dim=-1).cumsum(-1)
        ids = (cdf < torch.rand((2, 1), generator=gen) * cdf[:, -1:]).sum(-1)  # inverse-CDF draw
        out.append(vocab.chars[ids[0]])
        logits, state = model(ids[:, None], state)
    assert text == "".join(out)


def test_stop_string_ends_a_sample():
    vocab = Vocab.from_text(VERSE)
    model = make_model(vocab_size=len(vocab))
    full = _sample(model, vocab, 1, length=200, temperature=0.0)[0]
    stop = full[10:12]
    first = full.index(stop)
    stopped = _sample(model, vocab, 1, length=200, temperature=0.0, stop=stop)[0]
    assert stopped == full[: first + len(stop)]


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.clamp_min(1e-30).log().expand(20000, -1)
    ids = next_ids(logits, SampleSettings(temperature=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / 20000
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.015)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_text_and_scores_do_not_depend_on_the_cpus_thread_count(dtype):
    """A host's core count sets torch's intra-op threads (the suite runs on one); 32 decoded
    streams and an evaluation of a 2x256 model, wide enough for its matmuls to be split,
    are the same bits on 1 and 2 threads, in the precision given (bf16: the decoder's
    matmuls, and the LSTM where oneDNN runs it in bf16)."""
    from charrnn.config import ModelConfig
    from charrnn.device import cpu_runs_bf16_lstm
    from charrnn.infer.evaluate import evaluate
    from charrnn.model.network import CharRNN

    vocab = Vocab("".join(chr(c) for c in range(32, 127)))
    torch.manual_seed(0)
    net = CharRNN(ModelConfig(hidden_size=256, num_layers=2, embedding_size=32, dropout=0.0), len(vocab)).eval()
    ids = torch.randint(0, len(vocab), (6000,))
    texts, losses = [], []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        streams = [""] * 32
        for chars in generate(net, vocab, ids[:10], SampleSettings(length=60, temperature=1.0), 32,
                              torch.Generator().manual_seed(3), "cpu", dtype=dtype):
            streams = [s + c for s, c in zip(streams, chars)]
        texts.append(streams)
        if dtype is None or cpu_runs_bf16_lstm():
            losses.append(evaluate(net, ids, torch.device("cpu"), dtype).loss)
    assert texts[0] == texts[1] and len(set(texts[0])) > 1
    assert len(set(losses)) <= 1

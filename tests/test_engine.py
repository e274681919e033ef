"""The continuous-batching engine: each request writes what `charrnn sample` writes for
it, whatever else is being decoded beside it; cancelled rows are freed at once."""

import threading

import pytest
import torch
from conftest import CELLS, make_model, shaken

import charrnn
from charrnn.infer.evaluate import read
from charrnn.infer.sample import SampleSettings, next_ids, next_ids_rows
from charrnn.serve.engine import Engine
from charrnn.serve.runner import Runner
from charrnn.serve.sequence import Busy, Request


def drain(engine: Engine, sequences, limit=10_000):
    """Step until every sequence has ended; each one's texts and finish reasons."""
    for _ in range(limit):
        if all(s.finished for s in sequences):
            break
        engine.step()
    results = []
    for s in sequences:
        texts, reasons = [""] * s.request.n, [None] * s.request.n
        for event in s.events:
            if event[0] == "text":
                texts[event[1]] += event[2]
            elif event[0] == "finish":
                reasons[event[1]] = event[2]
        results.append((texts, reasons))
    return results


def sample_texts(model, prime, settings, n, seed):
    ids, _ = model.vocab.encode(prime)
    texts = [""] * n
    for chars in model.generate(ids, settings, n, seed):
        for j, char in enumerate(chars):
            texts[j] += char
    return texts


def request(model, prime, length=120, **options):
    ids, _ = model.vocab.encode(prime)
    return Request(prompt_ids=ids, length=length, **options)


@pytest.fixture(scope="module")
def model(trained_run):
    return charrnn.load(trained_run, device="cpu")


def test_a_request_writes_what_charrnn_sample_writes(model):
    settings = SampleSettings(length=150, temperature=0.8, top_p=0.9)
    expected = sample_texts(model, "The ", settings, 3, seed=11)
    engine = Engine(model)
    (texts, reasons), = drain(engine, [engine.submit(request(model, "The ", 150, temperature=0.8, top_p=0.9,
                                                              n=3, seed=11))])
    assert texts == expected and reasons == ["length"] * 3


def test_the_same_seed_gives_the_same_text_alone_and_among_31_others(model):
    alone_engine = Engine(model)
    mine = dict(temperature=0.9, top_p=0.95, seed=5)
    (alone, _), = drain(alone_engine, [alone_engine.submit(request(model, "whose woods", 200, **mine))])
    crowded = Engine(model, max_streams=64)
    others = [crowded.submit(request(model, "abc"[: 1 + k % 3], 30 + 7 * k, temperature=0.5 + k / 20,
                                     top_p=1.0 if k % 2 else 0.8, seed=100 + k)) for k in range(16)]
    crowded.step()
    crowded.step()  # mine joins while the others are mid-stream, and more join after it
    target = crowded.submit(request(model, "whose woods", 200, **mine))
    crowded.step()
    others += [crowded.submit(request(model, "s", 90, temperature=1.2, seed=k)) for k in range(15)]
    results = drain(crowded, [target, *others])
    assert results[0][0] == alone
    assert crowded.active_streams == 0


def test_greedy_and_a_stop_string_as_charrnn_sample_then_left_out(model):
    settings = SampleSettings(length=200, temperature=0.0, stop="e")
    expected, = sample_texts(model, "and ", settings, 1, seed=0)
    assert expected.endswith("e")
    engine = Engine(model)
    (texts, reasons), = drain(engine, [engine.submit(request(model, "and ", 200, temperature=0.0,
                                                              stop=("e",)))])
    assert texts == [expected[:-1]] and reasons == ["stop"]


def test_a_stop_string_is_held_back_until_it_can_no_longer_match(model):
    sampled, = sample_texts(model, "The", SampleSettings(length=300, temperature=1.0), 1, seed=3)
    stop = sampled[100:103]  # a three-character string the sample writes at 100
    first = sampled.index(stop)
    engine = Engine(model)
    sequence = engine.submit(request(model, "The", 300, temperature=1.0, seed=3, stop=(stop, "never written")))
    (texts, reasons), = drain(engine, [sequence])
    assert texts == [sampled[:first]] and reasons == ["stop"]
    handed = "".join(e[2] for e in sequence.events if e[0] == "text")
    assert handed == sampled[:first]  # nothing of the stop string was ever handed on


def test_a_cancelled_sequence_frees_its_rows_at_the_next_step(model):
    engine = Engine(model)
    keep = engine.submit(request(model, "a", 500, seed=1))
    gone = engine.submit(request(model, "b", 500, seed=2, n=3))
    for _ in range(5):
        engine.step()
    assert engine.active_streams == 4
    engine.cancel(gone)
    engine.step()
    assert engine.active_streams == 1 and gone.freed_step - gone.cancel_step <= 1
    assert not keep.finished


def test_rows_move_up_and_the_decoder_narrows_without_changing_anyones_text(model):
    engine = Engine(model, max_streams=64)
    long = engine.submit(request(model, "The", 160, temperature=0.7, seed=9))
    shorts = [engine.submit(request(model, "x", 3 + k, seed=k, n=2)) for k in range(12)]
    results = drain(engine, [long, *shorts])
    assert engine._decoder.num_streams == engine.min_width  # narrowed back once the short ones left
    settings = SampleSettings(length=160, temperature=0.7)
    assert results[0][0] == sample_texts(model, "The", settings, 1, seed=9)


def test_full_rows_and_queue_refuse_with_busy(model):
    engine = Engine(model, max_streams=4, max_queued=2)
    engine.submit(request(model, "a", 10, n=4))
    engine.submit(request(model, "a", 10, n=2))
    with pytest.raises(Busy):
        engine.submit(request(model, "a", 10))
    with pytest.raises(Busy):
        Engine(model, max_streams=4).submit(request(model, "a", 10, n=5))


def test_logprobs_are_the_models_own_for_each_drawn_character(model):
    engine = Engine(model)
    sequence = engine.submit(request(model, "The", 40, temperature=1.0, seed=2, logprobs=3))
    (texts, _), = drain(engine, [sequence])
    entries = [e for event in sequence.events if event[0] == "text" for e in event[3]]
    ids = model.vocab.encode("The" + texts[0])[0].long()
    logits, _ = read(model.network, ids[None].long(), None, model.prior)
    expected = logits[0, 2:-1].float().log_softmax(-1).gather(1, ids[3:, None])[:, 0]
    assert len(entries) == 40
    assert "".join(char for char, _, _ in entries) == texts[0]
    assert torch.allclose(torch.tensor([lp for _, lp, _ in entries]), expected, atol=1e-4)
    assert all(len(top) == 3 and lp <= max(top.values()) + 1e-6 for _, lp, top in entries)


def test_rows_with_mixed_settings_draw_what_each_draws_alone():
    """next_ids_rows over rows of different requests == next_ids row by row, bit for bit."""
    torch.manual_seed(0)
    logits = torch.randn(6, 20) * 3
    temps, top_ps = [0.0, 0.7, 1.0, 1.3, 0.7, 2.0], [1.0, 0.9, 1.0, 0.5, 1.0, 0.99]
    uniforms = torch.cat([torch.rand((1, 1), generator=torch.Generator().manual_seed(r)) for r in range(6)])
    rows = next_ids_rows(logits, torch.tensor(temps)[:, None], torch.tensor(top_ps)[:, None], uniforms)
    alone = [next_ids(logits[r : r + 1], SampleSettings(temperature=temps[r], top_p=top_ps[r]),
                      torch.Generator().manual_seed(r))[0] for r in range(6)]
    assert rows.tolist() == [int(i) for i in alone]
    assert len(set(rows.tolist())) > 2  # the rows did draw different characters


def test_rows_with_no_greedy_or_top_p_row_skip_that_work_and_draw_the_same():
    torch.manual_seed(1)
    logits, temps = torch.randn(64, 30) * 3, torch.rand(64, 1) * 1.5 + 0.2
    uniforms, no_filter = torch.rand(64, 1), torch.ones(64, 1)
    full = next_ids_rows(logits, temps, no_filter, uniforms)
    assert torch.equal(next_ids_rows(logits, temps, no_filter, uniforms, greedy=False, nucleus=False), full)
    assert len(set(full.tolist())) > 5


@pytest.mark.parametrize("cell", CELLS)
def test_every_cells_rows_give_the_same_bits_at_every_width(cell):
    """fp32, the server's decoder (the row kernel): a stream's logits are the same bits at
    widths 1, 3, 4, 16 (its products split between two threads) and 32 (two lanes of 16
    on two threads; the 16 rows compared straddle them)."""
    from charrnn.infer import rows
    from charrnn.infer.decode import make_decoder
    from charrnn.infer.lanes import Lanes, widen

    if not rows.available():
        pytest.skip("charrnn.infer._rows is not built: the fallback's widths are tested below")
    network = shaken(make_model(cell, vocab_size=20, hidden_size=40))
    one = make_decoder(network, 1, invariant=True)
    assert one.invariant
    wide = widen(one, 32)
    assert isinstance(wide, Lanes)
    wide.threads = 2
    state = tuple(torch.randn(2, 32, 40) for _ in wide.state())
    wide.load_state(state)
    narrow = {width: one.with_streams(width) for width in (1, 3, 4, 16)}
    for width, decoder in narrow.items():
        decoder.threads = 2
        decoder.load_state(tuple(x[:, 8 : 8 + width] for x in state))
    ids = torch.randint(0, 20, (32,))
    for _ in range(20):
        a = wide.step(ids)
        for width, decoder in narrow.items():
            assert torch.equal(a[8 : 8 + width], decoder.step(ids[8 : 8 + width]))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_without_the_row_kernel_rows_give_the_same_bits_at_multiples_of_4(cell):
    """fp32, torch's matmul (the decoder where charrnn.infer._rows is not built): the same bits
    at every width that is a multiple of 4, the engine's minimum width then."""
    from charrnn.infer.decode import make_decoder

    network = shaken(make_model(cell, vocab_size=20))
    wide = make_decoder(network, 32)
    assert not wide.invariant
    state = tuple(torch.randn(2, 32, 24) for _ in wide.state())
    wide.load_state(state)
    narrow = wide.with_streams(4)
    narrow.load_state(tuple(x[:, 8:12] for x in state))
    ids = torch.randint(0, 20, (32,))
    for _ in range(20):
        a, b = wide.step(ids), narrow.step(ids[8:12])
        assert torch.equal(a[8:12], b)


def test_one_request_decodes_one_row_wide_and_many_share_the_products(model, monkeypatch):
    """With the row kernel a lone request is decoded one row wide (its products at the
    one-stream cost); without it, four rows wide, as before."""
    from charrnn.infer import rows

    engine = Engine(model)
    sequence = engine.submit(request(model, "a", 50, seed=1))
    engine.step()
    assert engine._decoder.num_streams == (1 if rows.available() else 4)
    drain(engine, [sequence])
    monkeypatch.setattr(rows, "available", lambda: False)
    fallback = Engine(model)
    assert fallback.min_width == 4 and not fallback._decoder.invariant


def test_one_runner_thread_steps_every_model_and_close_ends_what_is_open(model):
    """Every engine of a process is stepped on the one decoding thread, with two threads for
    its products from 16 rows up (the row kernel's, torch's intra-op ones staying at one:
    a split of an elementwise op may fall mid-row; or torch's, without the kernel);
    closing ends open sequences with an error event and refuses new ones."""
    first, second = Engine(model, threads=2), Engine(model, threads=2)
    stepped, counts = set(), []
    for engine in (first, second):
        step = engine.step

        def recorded(step=step, engine=engine):
            stepped.add(threading.get_ident())
            step()
            if engine._decoder.invariant:
                assert torch.get_num_threads() == 1
                counts.append(engine._decoder.threads)
            else:
                counts.append(torch.get_num_threads())
        engine.step = recorded
    runner = Runner([first, second])
    runner.start()
    caller_threads = torch.get_num_threads()
    done = [first.submit(request(model, "a", 20, seed=1, n=16)), second.submit(request(model, "b", 20, seed=2))]
    for _ in range(500):
        if all(s.finished for s in done):
            break
        threading.Event().wait(0.01)
    assert all(s.finished for s in done)
    assert stepped and threading.get_ident() not in stepped and len(stepped) == 1  # one thread, not this one
    assert 2 in counts and 1 in counts  # 16 rows: two intra-op threads; the single row alone: one
    assert torch.get_num_threads() == caller_threads  # the caller's own count is left as it was
    endless = first.submit(request(model, "c", 100_000, seed=3))
    runner.close("stopping")
    assert endless.finished and ("error", "stopping") in endless.events and endless.events[-1] == ("end",)
    with pytest.raises(Busy, match="stopping"):
        second.submit(request(model, "d", 5))


def reads(engine):
    """Count the prompts the engine's network reads (rows of each forward pass, padding included)."""
    rows, network = [], engine.network

    def counted(ids, *args, **kwargs):
        rows.append(len(ids))
        return network(ids, *args, **kwargs)
    engine.network = counted
    return rows


def test_a_prompt_is_read_once_and_its_kept_state_writes_the_same_text(model):
    engine = Engine(model)
    read = reads(engine)
    first = drain(engine, [engine.submit(request(model, "The king", 60, temperature=0.9, seed=4, n=2)),
                           engine.submit(request(model, "The king", 60, temperature=0.9, seed=4, n=3))])
    assert read == [4]  # both requests' five rows: one prompt, read once (padded to 4 rows)
    again = drain(engine, [engine.submit(request(model, "The king", 60, temperature=0.9, seed=4, n=2))])
    assert read == [4]  # not read again
    settings = SampleSettings(length=60, temperature=0.9)
    assert again[0] == first[0]  # same seed, same text, read or kept
    assert first[0][0] == sample_texts(model, "The king", settings, 2, seed=4)
    assert first[1][0] == sample_texts(model, "The king", settings, 3, seed=4)


def test_the_kept_prompts_are_bounded_and_the_least_recently_used_go_first(model, monkeypatch):
    from charrnn.serve import prompts

    monkeypatch.setattr(prompts, "PRIME_CACHE", 3)
    engine = Engine(model)
    read = reads(engine)
    for prime in ("a", "b", "c", "a", "d", "b"):  # d pushes out b (a was used again after b)
        drain(engine, [engine.submit(request(model, prime, 2, seed=1))])
    assert len(read) == 5 and len(engine._prime_cache) == 3  # a, b, c, d, b again


def test_rows_with_every_control_draw_what_each_draws_alone():
    """top_k, min_p, logit_bias and the penalties, row by row over rows that use them and
    rows that do not: next_ids_rows == next_ids for each row alone, bit for bit, over 40
    draws with the counts growing as they are drawn."""
    from charrnn.infer.sample import bias_row, count_drawn

    torch.manual_seed(2)
    size, rows = 24, 7
    settings = [SampleSettings(temperature=0.9),
                SampleSettings(temperature=0.8, top_k=3),
                SampleSettings(temperature=1.1, min_p=0.2, top_p=0.9),
                SampleSettings(temperature=1.0, frequency_penalty=1.5, logit_bias=((2, -100.0), (5, 4.0))),
                SampleSettings(temperature=0.0, presence_penalty=2.0, top_k=5),
                SampleSettings(temperature=1.3, top_k=30, frequency_penalty=-0.5, presence_penalty=0.7, min_p=0.05),
                SampleSettings(temperature=0.7, logit_bias=((0, 100.0),), top_p=0.5)]
    column = lambda name, dtype=torch.float32: torch.tensor([[getattr(s, name)] for s in settings], dtype=dtype)
    bias = torch.cat([bias_row(s.logit_bias, size) for s in settings])
    counts = torch.zeros(rows, size)
    alone_counts = [torch.zeros(1, size) for _ in range(rows)]
    generators = [torch.Generator().manual_seed(r) for r in range(rows)]
    for _ in range(40):
        logits = torch.randn(rows, size) * 3
        uniforms = torch.cat([torch.rand((1, 1), generator=torch.Generator().set_state(g.get_state()))
                              for g in generators])
        together = next_ids_rows(logits, column("temperature"), column("top_p"), uniforms, top_k=column("top_k", torch.long),
                                 min_p=column("min_p"), shaping=(bias, counts, column("frequency_penalty"),
                                                                 column("presence_penalty")))
        alone = [next_ids(logits[r : r + 1], settings[r], generators[r], alone_counts[r])[0] for r in range(rows)]
        assert together.tolist() == [int(i) for i in alone]
        count_drawn(counts, together)
        for r in range(rows):
            count_drawn(alone_counts[r], torch.tensor([int(alone[r])]))
    assert counts[3, 2] == 0 and counts[6, 0] > 30  # banned never, boosted nearly always
    assert torch.equal(counts, torch.cat(alone_counts))


def test_a_request_with_controls_writes_what_charrnn_sample_writes_among_others(model):
    """The same controls through the engine (with plain requests beside it) and through
    generate: the same text, at 1, 4 and 32 rows."""
    controls = dict(temperature=0.9, top_k=8, min_p=0.05, frequency_penalty=0.8, presence_penalty=0.3,
                    logit_bias=((model.vocab.chars.index("e"), -100.0),))
    expected = sample_texts(model, "The ", SampleSettings(length=150, **controls), 2, seed=21)
    assert all("e" not in text for text in expected)
    for others in (0, 2, 30):
        engine = Engine(model)
        mine = engine.submit(request(model, "The ", 150, n=2, seed=21, **controls))
        beside = [engine.submit(request(model, "fox", 150, seed=k, temperature=1.0)) for k in range(others)]
        (texts, _), *_ = drain(engine, [mine, *beside])
        assert texts == expected, others


def test_a_long_prompt_is_read_a_slice_a_step_without_stalling_the_others(model, monkeypatch):
    """A prompt longer than PRIME_SLICE waits in its place while it is read, one slice per
    step, and the streams being decoded draw a character at every one of those steps; the
    request then writes the same text as when it arrives alone, and a short prompt that
    queued behind it is not held up."""
    from charrnn.serve import prompts

    monkeypatch.setattr(prompts, "PRIME_SLICE", 16)
    long_prompt = ("The quick brown fox jumps over the lazy dog. " * 5)[:200]  # 13 slices of 16

    alone_engine = Engine(model)
    (alone, _), = drain(alone_engine, [alone_engine.submit(request(model, long_prompt, 60, seed=5, temperature=0.9))])

    engine = Engine(model)
    running = engine.submit(request(model, "fox", 400, seed=1, temperature=1.0))
    engine.step()
    late = engine.submit(request(model, long_prompt, 60, seed=5, temperature=0.9))
    short = engine.submit(request(model, "dog", 20, seed=2, temperature=1.0))
    drawn = []
    for _ in range(13):
        before = sum(len(e[2]) for e in running.events if e[0] == "text")
        engine.step()
        drawn.append(sum(len(e[2]) for e in running.events if e[0] == "text") - before)
        assert late not in engine._active  # still being read
    assert drawn == [1] * 13  # the running stream drew at every step of the read
    assert short in engine._active or short.finished  # admitted past the long prompt
    (crowded, _), *_ = drain(engine, [late, running, short])
    assert crowded == alone


def test_a_prompt_reads_the_same_bits_on_one_thread_or_two(model):
    """fp32. The engine reads prompts (4 rows at a time, and long ones a slice of one row a
    step) on two intra-op threads from 16 rows and on one below: the state must not care."""
    ids = torch.randint(0, model.network.vocab_size, (4, 300))
    results = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                state = None
                for start in range(0, 300, 32):
                    sliced, state = model.network(ids[:1, start : start + 32], state)
                batch = model.network(ids)
        finally:
            torch.set_num_threads(before)
        results.append([sliced, *state, batch[0], *batch[1]])
    assert all(torch.equal(a, b) for a, b in zip(*results))

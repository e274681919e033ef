"""Prepared corpora (charrnn.data.prepared): encoded once, mapped by every run, rebuilt when the
source changes, and every fault leaves nothing half-written. CPU, fp32 where a model runs."""

import errno
import io
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import VERSE, corpus_of, make_model, run_cli, tiny_configs

from charrnn import events
from charrnn.data import encode, prepared
from charrnn.data.batches import RandomWindows, RestartingStreams, StatefulBatches
from charrnn.data.text import Vocab, read_corpus
from charrnn.errors import DataError, TrainingInterrupted
from charrnn.infer.evaluate import evaluate, evaluate_windows
from charrnn.model.network import CharRNN
from charrnn.model.startmix import StartMix
from charrnn.store import checkpoint
from charrnn.training import run


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("CHARRNN_CACHE", str(directory))
    return directory / "ids"


def _leftovers(directory: Path) -> list[str]:
    """Files in directory other than finished id files: temporaries, spools."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".ids") or p.name.startswith(".")) \
        if directory.exists() else []


@pytest.mark.parametrize("read_bytes", [7, 1 << 22])
def test_prepared_ids_equal_the_in_memory_encoding(tmp_path, cache, monkeypatch, read_bytes):
    """Chunks of 7 bytes cut characters of 2, 3 and 4 bytes; the ids, vocabulary and hash are
    what the in-memory path gives, and the uint8 file holds one byte a character."""
    monkeypatch.setattr(prepared, "READ_BYTES", read_bytes)
    (tmp_path / "a.txt").write_text(VERSE * 30, encoding="utf-8")
    (tmp_path / "b.txt").write_text("ascii only\n" * 50, encoding="utf-8")
    paths = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    corpus = encode.prepare(paths)
    reference = read_corpus(paths)
    vocab = Vocab.from_data(reference)
    assert corpus.vocab.chars == vocab.chars and corpus.sha256 == reference.sha256
    assert torch.equal(corpus.ids, vocab.encode_data(reference)) and corpus.ids.dtype == torch.uint8
    assert corpus.path.parent == cache and corpus.path.stat().st_size == prepared.DATA_OFFSET + len(corpus.ids)


def test_a_vocabulary_over_256_characters_takes_int16(tmp_path, cache):
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 3 + "\n"
    (tmp_path / "cjk.txt").write_text(text, encoding="utf-8")
    corpus = encode.prepare([str(tmp_path / "cjk.txt")])
    assert corpus.ids.dtype == torch.int16 and corpus.vocab.decode(corpus.ids) == text


def test_an_unchanged_source_is_reused_and_a_changed_byte_rebuilds_it(tmp_path, cache):
    path = tmp_path / "text.txt"
    path.write_text(VERSE * 10, encoding="utf-8")
    first = encode.prepare([str(path)])
    again = encode.prepare([str(path)])
    assert not first.reused and again.reused and again.path == first.path
    data = bytearray(path.read_bytes())
    data[5] = ord("X")  # one byte, same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))  # a write a moment later
    changed = encode.prepare([str(path)])
    assert not changed.reused and changed.sha256 != first.sha256
    assert changed.vocab.decode(changed.ids) == bytes(data).decode("utf-8")


def test_a_directory_skips_files_that_are_not_text_and_hashes_the_rest(tmp_path, cache):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("first file\n", encoding="utf-8")
    (root / "sub" / "b.txt").write_text(VERSE, encoding="utf-8")
    (root / "bin.dat").write_bytes(b"\x00\x01\x02binary")
    (root / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    corpus = encode.prepare([str(root)])
    reference = read_corpus([str(root)])
    assert sorted(corpus.skipped) == sorted(reference.skipped) and len(corpus.skipped) == 2
    assert corpus.sha256 == reference.sha256 and corpus.vocab.decode(corpus.ids) == reference.data.decode("utf-8")
    assert encode.prepare([str(root)]).skipped == corpus.skipped  # said again when reused


def test_stdin_is_spooled_prepared_and_leaves_nothing_behind(cache):
    corpus = encode.prepare(["-"], stdin=io.BytesIO((VERSE * 5).encode("utf-8")))
    assert corpus.vocab.decode(corpus.ids) == VERSE * 5 and corpus.sources == ["-"]
    assert list(cache.iterdir()) == []  # the spool and the id file are gone; the map keeps the data


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"\x00\x01binary", "binary"),
                                              (b"ok \xff no", "first bad byte at offset 3")])
def test_bad_files_are_refused_and_nothing_is_written(tmp_path, cache, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        encode.prepare([str(path)])
    assert not any(cache.iterdir())


def test_a_full_disk_gives_one_line_and_leaves_no_file(tmp_path, cache, monkeypatch):
    path = tmp_path / "text.txt"
    path.write_text(VERSE * 10, encoding="utf-8")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(encode, "_encode", full)
    with pytest.raises(DataError, match="no space left on the disk of .* set CHARRNN_CACHE"):
        encode.prepare([str(path)])
    assert list(cache.iterdir()) == []


def test_ctrl_c_while_preparing_leaves_nothing_half_written(tmp_path, cache):
    path = tmp_path / "text.txt"
    path.write_text(VERSE * 10, encoding="utf-8")

    def interrupt(phase, done, total):
        if phase == "encoding":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode.prepare([str(path)], on_progress=interrupt)
    assert list(cache.iterdir()) == []
    assert not encode.prepare([str(path)]).reused  # and the next run prepares it whole


def test_a_source_that_changes_while_it_is_prepared_is_refused(tmp_path, cache):
    path = tmp_path / "text.txt"
    path.write_text(VERSE * 10, encoding="utf-8")

    def grow(phase, done, total):
        if phase == "encoding" and done == total:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write("more")

    with pytest.raises(DataError, match="changed while it was being prepared"):
        encode.prepare([str(path)], on_progress=grow)
    assert list(cache.iterdir()) == []


def test_an_unwritable_cache_falls_back_to_a_temporary_one_with_a_note(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache would be")
    monkeypatch.setenv("CHARRNN_CACHE", str(blocker))
    monkeypatch.setattr(encode.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = tmp_path / "text.txt"
    path.write_text(VERSE * 10, encoding="utf-8")
    notes = []
    corpus = encode.prepare([str(path)], on_notice=notes.append)
    assert corpus.path.is_relative_to(tmp_path / "tmp") and len(notes) == 1
    assert "is not writable" in notes[0] and "CHARRNN_CACHE" in notes[0]


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated or damaged"),
    (lambda p: p.write_bytes(p.read_bytes()[:12] + b"{not json" + p.read_bytes()[21:]), "corrupt header"),
])
def test_a_damaged_cached_file_is_rebuilt_and_a_named_one_refused(tmp_path, cache, damage, message):
    path = tmp_path / "text.txt"
    path.write_text(VERSE * 10, encoding="utf-8")
    first = encode.prepare([str(path)])
    damage(first.path)
    notes = []
    again = encode.prepare([str(path)], on_notice=notes.append)
    assert not again.reused and message in notes[0] and again.vocab.decode(again.ids) == VERSE * 10
    named = tmp_path / "named.ids"
    encode.prepare([str(path)], out=named)
    damage(named)
    with pytest.raises(DataError, match=message):
        encode.prepare([str(named)])


def test_an_id_file_from_a_newer_format_is_refused(tmp_path, cache):
    path = tmp_path / "text.txt"
    path.write_text(VERSE, encoding="utf-8")
    named = tmp_path / "named.ids"
    encode.prepare([str(path)], out=named)
    data = named.read_bytes()
    named.write_bytes(data.replace(b'"format": 1', b'"format": 9', 1))
    with pytest.raises(DataError, match="newer charrnn .*format 9"):
        encode.prepare([str(named)])


def test_remapped_ids_for_an_extended_vocabulary(tmp_path, cache):
    path = tmp_path / "text.txt"
    path.write_text("abcabc\n", encoding="utf-8")
    corpus = encode.prepare([str(path)])
    wider = Vocab("\n" + "ab" + "bc"[1] + "xyz")
    assert wider.decode(corpus.ids_for(wider)) == "abcabc\n"
    with pytest.raises(DataError, match="lacks"):
        corpus.ids_for(Vocab("ab"))


def test_evaluate_in_blocks_and_through_the_reader_equals_one_read(tmp_path, cache, monkeypatch):
    """The block-by-block read (and the IdReader's plain file reads) give the figure of
    reading each stream whole, bit for bit (fp32)."""
    path = tmp_path / "text.txt"
    path.write_text(VERSE * 200, encoding="utf-8")
    corpus = encode.prepare([str(path)])
    model = make_model(vocab_size=len(corpus.vocab))
    device = torch.device("cpu")
    whole = evaluate(model, corpus.ids, device, None, chunk=64, max_streams=4)
    monkeypatch.setattr("charrnn.infer.evaluate.BLOCK_CHUNKS", 3)
    blocks = evaluate(model, corpus.ids, device, None, chunk=64, max_streams=4)
    reader, dropped = prepared.ids_in(corpus, corpus.vocab)
    through_file = evaluate(model, reader, device, None, chunk=64, max_streams=4)
    assert dropped == 0 and isinstance(reader, prepared.IdReader)
    assert whole.loss == blocks.loss == through_file.loss and whole.chars == through_file.chars


def test_scoring_with_a_model_vocabulary_skips_or_names_unknown_characters(tmp_path, cache):
    path = tmp_path / "held.txt"
    path.write_text("abc é abc ééé\n", encoding="utf-8")
    corpus = encode.prepare([str(path)])
    vocab = Vocab("\n abc")
    with pytest.raises(DataError, match=r"4 character\(s\) unknown to the model: 'é' x4; use --unknown skip"):
        prepared.ids_in(corpus, vocab)
    reader, dropped = prepared.ids_in(corpus, vocab, "skip")
    assert dropped == 4 and vocab.decode(reader[0 : len(reader)]) == "abc  abc \n"
    assert _leftovers(cache) == []


def test_validation_reads_bounded_windows_drawn_once(monkeypatch):
    """A split longer than VAL_WINDOWS x VAL_WINDOW is read as those windows, the same
    every time for a seed; evaluate_windows scores each as evaluate scores it alone."""
    monkeypatch.setattr(run, "VAL_WINDOWS", 3)
    monkeypatch.setattr(run, "VAL_WINDOW", 50)
    val = torch.randint(0, 20, (1000,), dtype=torch.uint8)
    windows = run.validation_windows(val, seed=5)
    assert windows.shape == (3, 51) and torch.equal(windows, run.validation_windows(val, seed=5))
    assert run.validation_windows(val[:151], seed=5) is None  # short: read whole, as before
    model = make_model(vocab_size=20)
    device = torch.device("cpu")
    together = evaluate_windows(model, windows, device)
    alone = [evaluate(model, w, device, max_streams=1) for w in windows]
    assert together.chars == 150
    assert together.loss == pytest.approx(sum(r.loss * r.chars for r in alone) / 150, rel=1e-6)


def test_a_long_split_validates_on_windows_and_the_log_says_how_many(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(run, "VAL_WINDOWS", 4)
    monkeypatch.setattr(run, "VAL_WINDOW", 64)
    model_config, train_config = tiny_configs(train={"steps": 4, "eval_every": 2, "val_frac": 0.2})
    events = []
    trainer = run.trainer_for(corpus_of(VERSE * 40), model_config, train_config, tmp_path / "r", on_event=events.append)
    trainer.run()
    setup = next(e for e in events if type(e).__name__ == "Setup")
    assert setup.val_read == 4 * 64 and setup.val_chars > setup.val_read


def test_the_start_mix_counts_a_spread_sample_of_a_long_text_and_all_of_a_short_one(monkeypatch):
    ids = torch.randint(0, 6, (5000,))
    whole = StartMix.build(ids, 6)
    monkeypatch.setattr("charrnn.model.startmix.SAMPLE_CHARS", 1000)
    monkeypatch.setattr("charrnn.model.startmix.SAMPLE_BLOCKS", 4)
    sampled = StartMix.build(ids, 6)
    assert int(sampled.counts[0].sum()) == 1000 and int(whole.counts[0].sum()) == 5000
    stride = (5000 - 250) // 3
    blocks = [ids[i * stride : i * stride + 250] for i in range(4)]
    for n in range(1, sampled.order + 1):  # the n-grams within the blocks, merged
        expected = {}
        for block in blocks:
            for i in range(len(block) - n + 1):
                key = tuple(block[i : i + n].tolist())
                expected[key] = expected.get(key, 0) + 1
        assert int(sampled.counts[n - 1].sum()) == sum(expected.values()) and len(sampled.keys[n - 1]) == len(expected)
    short = StartMix.build(ids[:900], 6)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(short.keys, StartMix.build(ids[:900], 6).keys))


def test_resume_after_the_prepared_file_was_deleted_is_exact(tmp_path, cache):
    """20 steps straight == 10 steps, the cache emptied, then --resume re-prepares the corpus
    and continues (CPU, fp32)."""
    path = tmp_path / "text.txt"
    path.write_text(VERSE * 40, encoding="utf-8")
    common = dict(hidden_size=32, num_layers=1, embedding_size=16, dropout=0.0, batch_size=4, seq_len=16,
                  eval_every=5, sample_length=0, dtype="fp32", device="cpu", learning_rate=1e-2, warmup_steps=2)
    run.train(str(path), out=tmp_path / "a", steps=20, **common)

    def ctrl_c_at_10(event):
        if isinstance(event, events.Step) and event.step >= 10:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: finish the step, save, stop

    with pytest.raises(TrainingInterrupted, match="interrupted at step 10"):
        run.train(str(path), out=tmp_path / "b", steps=20, on_event=ctrl_c_at_10, **common)
    for file in cache.iterdir():
        file.unlink()
    run.train(resume=tmp_path / "b", steps=20)
    assert len(list(cache.iterdir())) == 1  # prepared again
    metrics = lambda d: [(r["step"], r["val_loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    a, b = checkpoint.load(tmp_path / "a" / "last.pt").model, checkpoint.load(tmp_path / "b" / "last.pt").model
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_prepare_then_train_and_eval_the_id_file(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(VERSE * 40, encoding="utf-8")
    env = {"CHARRNN_CACHE": str(tmp_path / "cache")}
    made = run_cli("prepare", text, "-o", tmp_path / "text.ids", "--json", env=env)
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert info["path"] == str(tmp_path / "text.ids") and info["chars"] == len(VERSE * 40) and not info["reused"]
    trained = run_cli("train", tmp_path / "text.ids", "--steps", 6, "--eval-every", 3, "--hidden-size", 32,
                      "--device", "cpu", "--dtype", "fp32", "-q", "-o", tmp_path / "run", env=env)
    assert trained.returncode == 0, trained.stderr
    assert f"prepared: {tmp_path / 'text.ids'} (reused)" in trained.stderr
    from_text = run_cli("eval", text, "-m", tmp_path / "run", "--json", "--device", "cpu", env=env)
    from_ids = run_cli("eval", tmp_path / "text.ids", "-m", tmp_path / "run", "--json", "--device", "cpu", env=env)
    assert json.loads(from_text.stdout)["loss"] == json.loads(from_ids.stdout)["loss"]
    bad = run_cli("prepare", text, "-o", tmp_path / "out.bin", env=env)
    assert bad.returncode == 2 and "ending in .ids" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("prepare", tmp_path / "nope.txt", env=env)
    assert missing.returncode == 1 and missing.stderr.strip() == f"error: {tmp_path / 'nope.txt'} does not exist; check the path"


@pytest.mark.parametrize("layout", ["windows", "restarting", "stateful"])
def test_batches_read_by_pread_equal_the_map_and_read_ahead_asks_for_the_next_batch(tmp_path, cache, layout):
    """The three batch layouts over a prepared file: the IdReader's windows are the map's,
    batch for batch, and after each batch the reader was told exactly the windows of the
    next one (drawn on a copy of the generator, which is left as it was)."""
    source = tmp_path / "text.txt"
    source.write_text(VERSE * 40)
    corpus = encode.prepare([str(source)])
    kinds = {"windows": lambda ids, reader: RandomWindows(ids, 4, 16, reader=reader),
             "restarting": lambda ids, reader: RestartingStreams(ids, 4, 16, 0.3, reader=reader),
             "stateful": lambda ids, reader: StatefulBatches(ids, 4, 16, reader=reader)}
    mapped = kinds[layout](corpus.ids, None)
    reader = prepared.reader_for(corpus, corpus.ids)
    asked = []
    reader.will_need = lambda starts, length: asked.append((starts.tolist(), length))
    read = kinds[layout](corpus.ids, reader)
    by_map, by_reader = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    previous = None
    for step in range(12):
        expected = mapped.batch(step if layout == "stateful" else by_map)
        got = read.batch(step if layout == "stateful" else by_reader)
        for a, b in zip(expected, got):
            assert torch.equal(a, b)
        if previous is not None:
            starts, length = previous
            assert length == 17
            window = torch.cat([got[0], got[1][:, -1:]], dim=1)
            assert torch.equal(torch.stack([corpus.ids[s : s + 17].long() for s in starts]), window)
            if layout == "stateful":
                assert starts == (read._row_starts + step * 16).tolist()
        previous = asked[-1]
    assert len(asked) == 12
    reader.close()

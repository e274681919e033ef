import io

import pytest
import torch
from conftest import VERSE

from charrnn.data.batches import RandomWindows, RestartingStreams, StatefulBatches
from charrnn.data.text import Vocab, embedded_corpus, iter_text, read_corpus, split, to_utf8
from charrnn.errors import DataError


def test_vocab_round_trip_non_ascii():
    vocab = Vocab.from_text(VERSE)
    ids, dropped = vocab.encode(VERSE)
    assert dropped == 0
    assert vocab.decode(ids) == VERSE
    assert list(vocab.chars) == sorted(set(VERSE))
    assert "🙂" in vocab and "\f" in vocab and "\t" in vocab


def test_vocab_from_data_matches_from_text():
    assert Vocab.from_data(VERSE.encode()).chars == Vocab.from_text(VERSE).chars


def test_ids_are_compact():
    assert Vocab.from_text("abc").encode("cab")[0].dtype == torch.uint8
    wide = "".join(chr(0x4E00 + i) for i in range(300))
    assert Vocab.from_text(wide).encode(wide)[0].dtype == torch.int16


def test_unknown_characters_error_names_them():
    vocab = Vocab.from_text("hello world")
    with pytest.raises(DataError, match=r"'Z'.*--unknown skip"):
        vocab.encode("hello Zorld")
    ids, dropped = vocab.encode("hello Zorld!", unknown="skip")
    assert dropped == 2 and vocab.decode(ids) == "hello orld"


def test_unknown_characters_are_named_by_how_often_they_occur_with_counts():
    vocab = Vocab.from_text("abcdefghijklmnopqrstuvwxyz .")
    # A Spanish text: 'ñ' (above 'z') is the most frequent stranger, after a dozen rarer ones.
    text = "año niño señor mañana " * 5 + "ABCDEFGHIJKLMN"
    with pytest.raises(DataError) as caught:
        vocab.encode(text)
    message = str(caught.value)
    assert message.index("'ñ' x20") < message.index("'A' x1")
    assert "and 3 more" in message and f"{20 + 14} character(s)" in message


def test_character_above_every_known_code_point_is_unknown():
    vocab = Vocab.from_text("ab")
    ids, dropped = vocab.encode("a😀b", unknown="skip")
    assert dropped == 1 and vocab.decode(ids) == "ab"


def test_chunked_decoding_never_splits_a_character():
    data = ("é春🙂x" * 50).encode()
    assert "".join(iter_text(data, chunk_bytes=3)) == data.decode()
    vocab = Vocab.from_text(data.decode())
    assert vocab.decode(vocab.encode_data(data)) == data.decode()


def test_invalid_utf8_reports_byte_offset():
    raw = "héllo".encode() + b"\xff" + b"rest"
    with pytest.raises(DataError, match=r"offset 6"):
        to_utf8(raw, "x.txt")


def test_invalid_utf8_offset_across_chunks(monkeypatch):
    import charrnn.data.text as data

    monkeypatch.setattr(data, "CHUNK_BYTES", 4)
    raw = "aaé".encode() + b"bb\xc3(" + b"zz"  # bad continuation byte at offset 7
    with pytest.raises(DataError, match=r"offset 6"):
        to_utf8(raw, "x.txt")


def test_other_encoding_is_converted():
    assert to_utf8("café".encode("latin-1"), "x", encoding="latin-1") == "café".encode()


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    (b"ok\xfe\xfftext", "not valid UTF-8"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_corpus([str(path)])


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_corpus([str(tmp_path / "nope.txt")])


def test_directory_reads_text_files_sorted_and_skips_others(tmp_path):
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "img.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / ".hidden").write_text("secret\n")
    corpus = read_corpus([str(tmp_path)])
    assert corpus.data == b"first\nsecond\n"
    assert corpus.skipped == [str(tmp_path / "img.bin")]


def test_stdin_and_several_files(tmp_path):
    (tmp_path / "a.txt").write_text("one ")
    corpus = read_corpus([str(tmp_path / "a.txt"), "-"], stdin=io.BytesIO("two".encode()))
    assert corpus.data == b"one two" and corpus.name == "a"


def test_embedded_corpus_is_python_docs():
    corpus = embedded_corpus()
    assert len(corpus.data) > 100_000 and b"assert" in corpus.data


def test_split_keeps_order():
    ids = torch.arange(100)
    train, val = split(ids, 0.1)
    assert torch.equal(torch.cat([train, val]), ids) and len(val) == 10


def test_stateful_batches_continue_each_stream():
    ids = torch.arange(1000) % 251
    batches = StatefulBatches(ids.to(torch.uint8), batch_size=4, seq_len=10)
    stream_len = 999 // 4
    assert batches.steps_per_epoch == stream_len // 10
    x0, y0 = batches.batch(0)
    x1, _ = batches.batch(1)
    assert x0.shape == (4, 10) and x0.dtype == torch.int64
    for b in range(4):
        start = b * stream_len
        assert x0[b].tolist() == (torch.arange(start, start + 10) % 251).tolist()
        assert x1[b].tolist() == (torch.arange(start + 10, start + 20) % 251).tolist()
    assert torch.equal(y0[:, :-1], x0[:, 1:]) and torch.equal(y0[:, -1], x1[:, 0])


def test_corpus_shorter_than_a_batch():
    with pytest.raises(DataError, match="shorter than one batch"):
        StatefulBatches(torch.zeros(50, dtype=torch.uint8), batch_size=8, seq_len=10)
    with pytest.raises(DataError, match="shorter than one batch"):
        RandomWindows(torch.zeros(50, dtype=torch.uint8), batch_size=8, seq_len=10)


def test_random_windows_are_shifted_and_seeded():
    ids = torch.arange(500)
    windows = RandomWindows(ids, batch_size=3, seq_len=7)
    x, y = windows.batch(torch.Generator().manual_seed(0))
    x2, _ = windows.batch(torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, x + 1)


def test_files_are_streamed_not_loaded(tmp_path, monkeypatch):
    import charrnn.data.text as data

    monkeypatch.setattr(data, "CHUNK_BYTES", 5)  # characters cut across chunk boundaries
    text = "é春🙂 line\n" * 40
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text("tail ✓\n")
    corpus = read_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    assert all(not isinstance(part, bytes) for part in corpus.parts)  # kept as paths
    whole = text + "tail ✓\n"
    assert corpus.size == len(whole.encode()) and corpus.data == whole.encode()
    vocab = Vocab.from_data(corpus)
    assert vocab.chars == Vocab.from_text(whole).chars
    assert vocab.decode(vocab.encode_data(corpus)) == whole


def test_utf8_ending_inside_a_character(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes("abc".encode() + "é".encode()[:1])
    with pytest.raises(DataError, match="ends inside a character"):
        read_corpus([str(path)])


def test_restarting_streams_carry_on_or_jump_and_never_run_off_the_end():
    ids = torch.arange(1000) % 251  # distinct enough to locate a window
    batches = RestartingStreams(ids.to(torch.uint8), batch_size=6, seq_len=10, restart=0.3)
    generator = torch.Generator().manual_seed(0)
    previous_end = None
    jumped_any = carried_any = False
    for _ in range(200):
        x, y, restarted = batches.batch(generator)
        assert x.shape == y.shape == (6, 10) and restarted.shape == (6,)
        assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the next characters
        if previous_end is not None:
            continues = x[:, 0] == (previous_end + 1) % 251
            # A stream that did not restart reads on from where it stopped.
            assert torch.all(continues[~restarted])
            jumped_any |= bool(restarted.any())
            carried_any |= bool((~restarted).any())
        previous_end = x[:, -1]
        assert int(batches.cursors.max()) <= len(ids) - 1 + 10
    assert jumped_any and carried_any


def test_restart_probability_one_is_random_windows_every_step():
    batches = RestartingStreams(torch.arange(500).to(torch.int16), batch_size=4, seq_len=8, restart=1.0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        _, _, restarted = batches.batch(generator)
        assert restarted.all()

"""Corpora, the character vocabulary, and the batch layouts of training.

A corpus is read as UTF-8 bytes, checked, and encoded chunk by chunk into a compact
integer tensor (uint8 when the vocabulary has at most 256 symbols), so a 100 MB file
never becomes a Python list or an int64 tensor.
"""

from __future__ import annotations

import codecs
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import torch

from charrnn.errors import DataError, UsageError, not_unicode

CHUNK_BYTES = 1 << 20
EMBEDDED_SOURCE = "<embedded: Python reference docs from pydoc_data.topics>"
EMBEDDED_NAME = "pydoc-topics"


@dataclass
class Corpus:
    """Validated UTF-8 training text and where it came from.

    `parts` are bytes in memory or paths of files already checked; files are streamed
    in chunks when encoded, so a large corpus is never held as bytes and ids at once.
    """

    name: str  # short name for the run directory
    sources: list[str]  # paths as given (or "-" / the embedded marker)
    parts: list[bytes | Path] | bytes  # UTF-8 bytes, or files of UTF-8 text
    skipped: list[str] = field(default_factory=list)  # files of a directory that were not text

    def __post_init__(self):
        if isinstance(self.parts, bytes):
            self.parts = [self.parts]

    def chunks(self, size: int | None = None) -> Iterator[bytes]:
        size = size or CHUNK_BYTES
        for part in self.parts:
            if isinstance(part, bytes):
                yield from (part[i : i + size] for i in range(0, len(part), size))
            else:
                with open(part, "rb") as handle:
                    while block := handle.read(size):
                        yield block

    @property
    def size(self) -> int:
        """Bytes of UTF-8."""
        return sum(len(p) if isinstance(p, bytes) else p.stat().st_size for p in self.parts)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks())

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        return digest.hexdigest()


def embedded_corpus() -> Corpus:
    """The default corpus every Python has: the reference docs behind `help('topics')`."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip("\n") for key in sorted(topics)) + "\n"
    return Corpus(EMBEDDED_NAME, [EMBEDDED_SOURCE], text.encode("utf-8"))


def rereadable(sources: list[str]) -> list[str]:
    """The paths to give read_corpus to read a run's corpus again, from the sources its
    checkpoint recorded: the embedded corpus's marker becomes no path (read_corpus([]) is
    the embedded corpus again)."""
    return [s for s in sources if s != EMBEDDED_SOURCE]


def read_corpus(paths: list[str], encoding: str = "utf-8", stdin: BinaryIO | None = None) -> Corpus:
    """Read files, directories (their text files, sorted) or '-' (stdin) as one corpus."""
    if not paths:
        return embedded_corpus()
    parts, skipped = [], []
    for given in paths:
        if given == "-":
            raw = (stdin or sys.stdin.buffer).read()
            parts.append(to_utf8(raw, "standard input", encoding))
            continue
        path = Path(given)
        if path.is_dir():
            files = [p for p in sorted(path.rglob("*")) if p.is_file() and not _hidden(p, path)]
            found = 0
            for file in files:
                try:
                    parts.append(_checked_file(file, str(file), encoding))
                    found += 1
                except DataError:
                    skipped.append(str(file))
            if not found:
                raise DataError(f"directory {given} holds no non-empty text files")
        else:
            parts.append(_checked_file(path, given, encoding))
    name = "stdin" if paths[0] == "-" else (Path(paths[0]).stem or Path(paths[0]).name or "corpus")
    return Corpus(name, list(paths), parts, skipped)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _checked_file(path: Path, source: str, encoding: str) -> bytes | Path:
    """A UTF-8 file checked by streaming it (kept as its path), or another encoding converted."""
    try:
        if not path.is_file():
            raise DataError(f"{source} does not exist; check the path" if not path.exists() else f"{source} is not a file")
        if _is_utf8(encoding):
            with open(path, "rb") as handle:
                _check_utf8(iter(lambda: handle.read(CHUNK_BYTES), b""), source)
            return path
        return to_utf8(path.read_bytes(), source, encoding)
    except OSError as err:
        raise DataError(f"cannot read {source}: {err.strerror}") from None


def _is_utf8(encoding: str) -> bool:
    try:
        return codecs.lookup(encoding).name == "utf-8"
    except (LookupError, UnicodeError):  # a name with a lone surrogate cannot even be looked up
        raise UsageError(f"--encoding {encoding!r} is not a known text encoding") from None


def to_utf8(raw: bytes, source: str, encoding: str = "utf-8") -> bytes:
    """Check that raw bytes are non-empty text in `encoding`; return them as UTF-8."""
    if _is_utf8(encoding):
        _check_utf8((raw[i : i + CHUNK_BYTES] for i in range(0, len(raw), CHUNK_BYTES)), source)
        return raw
    if not raw:
        raise DataError(f"{source} is empty; give a text file with some content")
    try:
        return raw.decode(encoding).encode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{source} is not valid {encoding}: bad byte at offset {err.start}") from None


def _check_utf8(chunks: Iterable[bytes], source: str) -> None:
    """Non-empty, not binary (NUL bytes), valid UTF-8; errors name the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    for chunk in chunks:
        if offset == 0 and b"\x00" in chunk[: 1 << 16]:
            raise DataError(f"{source} looks like a binary file (it contains NUL bytes), not text")
        pending = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as err:
            raise DataError(
                f"{source} is not valid UTF-8: first bad byte at offset {offset - pending + err.start}"
                " (pass --encoding if it is in another encoding)"
            ) from None
        offset += len(chunk)
    if offset == 0:
        raise DataError(f"{source} is empty; give a text file with some content")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{source} is not valid UTF-8: it ends inside a character") from None


def iter_text(data: bytes | Corpus, chunk_bytes: int | None = None) -> Iterator[str]:
    """Decode UTF-8 a chunk at a time (a character never straddles two chunks)."""
    chunks = data.chunks(chunk_bytes) if isinstance(data, Corpus) else Corpus("", [], data).chunks(chunk_bytes)
    decoder = codecs.getincrementaldecoder("utf-8")()
    for chunk in chunks:
        piece = decoder.decode(chunk)
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def code_points(text: str, field: str = "the text") -> torch.Tensor:
    """The Unicode code points of text as an int32 tensor, without a Python loop; TextError
    (naming field) where text is not valid Unicode."""
    if not text:
        return torch.zeros(0, dtype=torch.int32)
    try:
        data = text.encode("utf-32-le")
    except UnicodeEncodeError as err:
        raise not_unicode(text, err.start, field) from None
    return torch.frombuffer(bytearray(data), dtype=torch.int32)


class Vocab:
    """The sorted distinct code points of the training text; a character's id is its rank."""

    def __init__(self, chars: str):
        if not chars:
            raise DataError("the vocabulary is empty")
        self.chars = chars
        codes = code_points(chars).long()
        if not bool((codes[1:] > codes[:-1]).all()):
            raise DataError("vocabulary characters must be distinct and sorted")
        # Lookup table code point -> id, with -1 for characters the model does not know;
        # the last slot catches every code point above the largest known one.
        self._table = torch.full((int(codes[-1]) + 2,), -1, dtype=torch.int32)
        self._table[codes] = torch.arange(len(chars), dtype=torch.int32)
        self.dtype = torch.uint8 if len(chars) <= 256 else torch.int16 if len(chars) <= 32767 else torch.int32

    @classmethod
    def from_data(cls, data: bytes | Corpus) -> "Vocab":
        # A set per chunk: set() runs in C and, unlike torch.unique on code points, leaves
        # no large temporaries behind (those grew a 100 MB corpus's peak RSS by 90 MB).
        seen: set[str] = set()
        for piece in iter_text(data):
            seen.update(piece)
        return cls("".join(sorted(seen)))

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, char: str) -> bool:
        return char in self.chars

    def _lookup(self, text: str, field: str = "the text") -> torch.Tensor:
        codes = code_points(text, field)
        return self._table[codes.clamp_(max=len(self._table) - 1)]  # int32 indices: no int64 copy

    def encode(self, text: str, unknown: str = "error", field: str = "the text") -> tuple[torch.Tensor, int]:
        """Ids of text (dtype self.dtype) and how many unknown characters were dropped.

        unknown="error" raises DataError naming the characters; "skip" drops them. Text
        that is not valid Unicode raises TextError naming field.
        """
        ids = self._lookup(text, field)
        missing = ids < 0
        dropped = int(missing.sum())
        if dropped:
            if unknown != "skip":
                raise DataError(f"{dropped} character(s) unknown to the model: {_by_count(code_points(text)[missing])}; "
                                "use --unknown skip to drop them")
            ids = ids[~missing]
        return ids.to(self.dtype), dropped

    def encode_data(self, data: bytes | Corpus) -> torch.Tensor:
        """Ids of a whole UTF-8 corpus, chunk by chunk into one preallocated tensor."""
        out = torch.empty(data.size if isinstance(data, Corpus) else len(data), dtype=self.dtype)  # chars <= bytes
        filled = 0
        for piece in iter_text(data):
            ids, _ = self.encode(piece)
            out[filled : filled + len(ids)] = ids
            filled += len(ids)
        return out[:filled]

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        chars = self.chars
        return "".join(chars[i] for i in ids)


def _by_count(codes: torch.Tensor, shown: int = 12) -> str:
    """The distinct characters of codes, the most frequent first, with their counts:
    "'ñ' x41, 'á' x12, ... and 3 more"."""
    distinct, counts = torch.unique(codes, return_counts=True)
    order = counts.argsort(descending=True, stable=True)
    parts = [f"{chr(int(distinct[i]))!r} x{int(counts[i])}" for i in order[:shown]]
    rest = len(distinct) - shown
    return ", ".join(parts) + (f" and {rest} more" if rest > 0 else "")


def split(ids: torch.Tensor, val_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """First (1 - val_frac) of the characters train, the rest validate."""
    cut = int(len(ids) * (1.0 - val_frac))
    return ids[:cut], ids[cut:]


def _too_short(chars: int, batch_size: int, seq_len: int) -> DataError:
    return DataError(
        f"the training text ({chars:,} characters) is shorter than one batch "
        f"(batch size {batch_size} x sequence length {seq_len} + 1); "
        "use a longer corpus or lower --batch-size / --seq-len"
    )


class StatefulBatches:
    """Truncated-BPTT batches over B contiguous streams, as in char-rnn.

    The training split is cut into B equal streams, one per batch row. Step k takes the
    next T characters of every stream, so row b of step k+1 continues row b of step k
    and the hidden state can be carried (detached) from one step to the next::

        corpus:  |---- stream 0 ----|---- stream 1 ----| ... |-- stream B-1 --|
                 step:  0    1    2   ...                     (S // T steps per epoch)
        x[k] = [[s0[kT : kT+T]],        y[k] = x[k] shifted left by one character
                [s1[kT : kT+T]],
                 ...
                [sB-1[kT : kT+T]]]      # (B, T)

    `rows` selects which streams this process owns (all of them in one process).
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, rows: slice = slice(None), reader=None):
        stream_len = (len(ids) - 1) // batch_size
        if stream_len < seq_len:
            raise _too_short(len(ids), batch_size, seq_len)
        used = batch_size * stream_len
        self.x = ids[:used].view(batch_size, stream_len)[rows]  # (B, S)
        self.y = ids[1 : used + 1].view(batch_size, stream_len)[rows]  # (B, S)
        self.seq_len = seq_len
        self.steps_per_epoch = stream_len // seq_len
        # reader (charrnn.data.prepared.IdReader): the same ids read with a pread per row, not through the map
        self.reader, self._row_starts = reader, torch.arange(batch_size)[rows] * stream_len

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The index-th (x, y) of an epoch, each (B, T) int64."""
        if self.reader is not None:
            window = self.reader.windows(self._row_starts + index * self.seq_len, self.seq_len + 1).long()
            following = (index + 1) % self.steps_per_epoch
            self.reader.will_need(self._row_starts + following * self.seq_len, self.seq_len + 1)
            return window[:, :-1], window[:, 1:]
        cols = slice(index * self.seq_len, (index + 1) * self.seq_len)
        return self.x[:, cols].long(), self.y[:, cols].long()


class RandomWindows:
    """Stateless batches: B windows of T characters at random offsets, from a generator.

    Every rank draws all B offsets from the same generator and reads its own rows, so N
    ranks train on the batches one process trains on."""

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, rows: slice = slice(None), reader=None):
        if len(ids) < seq_len + 1 or len(ids) < batch_size * seq_len + 1:
            raise _too_short(len(ids), batch_size, seq_len)
        self.ids = ids
        self.reader = reader  # charrnn.data.prepared.IdReader: the same ids read with a pread per window
        self.batch_size = batch_size
        self.rows = rows
        self.seq_len = seq_len
        # An "epoch" is as many windows as cover the split once, so epochs mean the same in both modes.
        self.steps_per_epoch = max(1, (len(ids) - 1) // (batch_size * seq_len))
        self._offsets = torch.arange(seq_len + 1, device=ids.device)

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        window = self._windows(self._starts(generator))  # (rows, T + 1)
        self._read_ahead(generator)
        return window[:, :-1], window[:, 1:]

    def _starts(self, generator: torch.Generator) -> torch.Tensor:
        """This rank's window starts of the next batch, drawn from generator."""
        return torch.randint(0, len(self.ids) - self.seq_len, (self.batch_size, 1), generator=generator)[self.rows, 0]

    def _read_ahead(self, generator: torch.Generator) -> None:
        """With a reader: ask for the following batch's windows now, drawn from a copy of
        the generator (the generator itself, and so every batch, untouched)."""
        if self.reader is not None:
            ahead = torch.Generator().set_state(generator.get_state())
            self.reader.will_need(self._starts(ahead), self.seq_len + 1)

    def _windows(self, starts: torch.Tensor) -> torch.Tensor:
        """ids[starts[:, None] + arange(T + 1)], int64."""
        if self.reader is not None:
            return self.reader.windows(starts, self.seq_len + 1).long()
        return self.ids[starts[:, None].to(self.ids.device) + self._offsets].long()


class RestartingStreams(RandomWindows):
    """Stateful batches whose streams restart at random places: B cursors into the text.

    Each step every stream takes the next T characters from its cursor, as in
    StatefulBatches, so the state carried from one step to the next reads on; but each
    stream, with probability `restart` per step (and whenever it would run off the end),
    jumps to a random offset and starts again from the model's start state::

        stream b:  ...|--T--|--T--|--T--|  jump  |--T--|--T--| ...
                            carried state    start state, carried again

    A stream thus runs 1/restart windows on average: long context for the state to carry,
    a start from the start state often enough for the model to learn reading from it, and
    batches that, unlike fixed streams, are not the same B places of the text in the same
    order every epoch. `restart` = 1 is random windows from the start state.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, restart: float, rows: slice = slice(None),
                 reader=None):
        super().__init__(ids, batch_size, seq_len, rows, reader)
        self.restart = restart
        # All B cursors, on every rank (the same generator draws the same jumps there), so
        # N ranks read what one process reads; this rank takes its rows.
        self.cursors = torch.arange(batch_size) * ((len(ids) - 1) // batch_size)  # (B,) evenly spaced at first

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), each (rows, T) int64, and which of its streams restarted."""
        jump, self.cursors = self._jumps(generator, self.cursors)
        window = self._windows(self.cursors[self.rows])  # (rows, T + 1)
        self.cursors = self.cursors + self.seq_len
        self._read_ahead(generator)
        return window[:, :-1], window[:, 1:], jump[self.rows].to(self.ids.device)

    def _jumps(self, generator: torch.Generator, cursors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which streams restart this step, and every stream's cursor after the restarts."""
        last = len(self.ids) - self.seq_len - 1  # the largest cursor with a whole window after it
        jump = torch.rand(len(cursors), generator=generator) < self.restart
        jump |= cursors > last
        fresh = torch.randint(0, last + 1, (len(cursors),), generator=generator)
        return jump, torch.where(jump, fresh, cursors)

    def _starts(self, generator: torch.Generator) -> torch.Tensor:
        return self._jumps(generator, self.cursors)[1][self.rows]

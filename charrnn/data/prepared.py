"""Prepared corpora: a corpus encoded once into an id file that every run memory-maps.

The first run on a corpus streams it, in chunks and whatever its size, through two passes:
the first checks it is UTF-8 text and counts its characters and vocabulary (and hashes it),
the second encodes it into an id file. Every later run, `charrnn eval`, `--init-from`
and every torchrun rank maps that file (one copy in the page cache however many
processes read it) and starts in seconds; a source whose size or modification time
changed is prepared again, never silently reused.

An id file::

    bytes 0-7     b"CHARIDS\\n"
    bytes 8-11    the header's length, uint32 little-endian
    bytes 12-     the header, JSON: format, vocabulary, chars, dtype, sha256 of the
                  text, name, sources and how they are recognised (path, size, mtime)
    DATA_OFFSET   the ids, `chars` of them, little-endian, uint8 where the vocabulary
                  has at most 256 characters (int16 / int32 only when it must)

The split into training and validation is not stored: a run cuts it from its own
val_frac, as a view of the mapped ids (nothing is copied).

Where the cache lives: $CHARRNN_CACHE, else $XDG_CACHE_HOME/charrnn, else
~/.cache/charrnn (`ids/` below it); never beside the user's corpus unless asked
(`charrnn prepare CORPUS -o FILE.ids`). Not detected: a source rewritten to the same size
with its modification time set back, and bytes flipped inside the ids (the header and
the length are checked).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from charrnn.data.text import Corpus, Vocab
from charrnn.errors import DataError

MAGIC = b"CHARIDS\n"
FORMAT = 1
DATA_OFFSET = 1 << 16  # the header's room; the ids start page-aligned after it
READ_BYTES = 1 << 22  # bytes a pass reads at a time
SUFFIX = ".ids"
UNICODE = 0x110000
READ_THREADS = 16  # windows read side by side (random reads of a disk overlap)

# on_progress(phase, done, total): bytes done of total in a pass ("checking", "encoding")
Progress = Callable[[str, int, int], None]


@dataclass
class Prepared:
    """A corpus as mapped ids with its own vocabulary; stands in for the Corpus it came from."""

    name: str
    sources: list[str]  # as given
    vocab: Vocab  # the corpus's own characters
    ids: torch.Tensor  # (N,) the whole text, mapped from `path` (or in memory)
    sha256: str  # of the UTF-8 text
    size: int  # bytes of UTF-8
    skipped: list[str] = field(default_factory=list)  # files of a directory that were not text
    path: Path | None = None  # the id file (None: in memory)
    reused: bool = False  # mapped from an earlier preparation

    def ids_for(self, vocab: Vocab) -> torch.Tensor:
        """The text's ids in `vocab` (a run's, which may extend the corpus's own): the mapped
        ids themselves when the vocabularies agree, else remapped chunk by chunk."""
        if vocab.chars == self.vocab.chars:
            return self.ids
        table = vocab._lookup(self.vocab.chars)  # (V_corpus,) vocab's id of each of the corpus's characters
        if bool((table < 0).any()):
            missing = "".join(c for c, i in zip(self.vocab.chars, table.tolist()) if i < 0)
            raise DataError(f"the corpus has characters the model's vocabulary lacks: {missing!r}")
        table = table.to(vocab.dtype)
        out = torch.empty(len(self.ids), dtype=vocab.dtype)
        for start in range(0, len(self.ids), READ_BYTES):
            torch.index_select(table, 0, self.ids[start : start + READ_BYTES].int(),
                               out=out[start : start + READ_BYTES].view(-1))
        return out


def cache_dir() -> Path:
    """Where prepared files are kept: $CHARRNN_CACHE, $XDG_CACHE_HOME/charrnn or ~/.cache/charrnn."""
    if os.environ.get("CHARRNN_CACHE"):
        return Path(os.environ["CHARRNN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "charrnn"


def is_id_file(path: str | Path) -> bool:
    """Whether path is a prepared id file (its first bytes say so)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# -- reading a prepared file -----------------------------------------------------------------

def read_header(path: Path) -> dict:
    """The header of an id file, checked against the file's length; DataError if it is not whole."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(DATA_OFFSET)
            length = os.fstat(handle.fileno()).st_size
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    if head[: len(MAGIC)] != MAGIC or len(head) < 12:
        raise DataError(f"{path} is not a charrnn id file")
    (size,) = struct.unpack("<I", head[8:12])
    try:
        header = json.loads(head[12 : 12 + size].decode("utf-8", "surrogateescape"))
        version, chars, itemsize = int(header["format"]), int(header["chars"]), _dtype(header["dtype"]).itemsize
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DataError(f"{path} has a corrupt header; prepare the corpus again") from None
    if version > FORMAT:
        raise DataError(f"{path} was written by a newer charrnn (id file format {version}, this one reads {FORMAT}); "
                        "upgrade charrnn or prepare the corpus again")
    if length != DATA_OFFSET + chars * itemsize:
        raise DataError(f"{path} is truncated or damaged ({length:,} bytes where its header says "
                        f"{DATA_OFFSET + chars * itemsize:,}); prepare the corpus again")
    return header


def _dtype(name: str) -> torch.dtype:
    return {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32}[name]


def open_prepared(path: str | Path, sources: list[str] | None = None, reused: bool = True) -> Prepared:
    """Map an id file (nothing is read but its header): the text's ids as a tensor whose
    pages the kernel shares between every process that maps the same file."""
    path = Path(path)
    header = read_header(path)
    chars = int(header["chars"])
    dtype = _dtype(header["dtype"])
    whole = torch.from_file(str(path), shared=False, size=DATA_OFFSET + chars * dtype.itemsize, dtype=torch.uint8)
    ids = whole[DATA_OFFSET:].view(dtype)
    vocab = Vocab(header["vocab"])
    return Prepared(header["name"], sources if sources is not None else header["given"], vocab, ids,
                    header["sha256"], int(header["bytes"]), list(header.get("skipped", [])), path, reused)


# -- preparing ---------------------------------------------------------------------------------

def in_memory(corpus: Corpus) -> Prepared:
    """A corpus held in memory (the embedded one, converted encodings, a test's bytes) encoded there."""
    vocab = Vocab.from_data(corpus)
    return Prepared(corpus.name, list(corpus.sources), vocab, vocab.encode_data(corpus), corpus.sha256, corpus.size,
                    list(corpus.skipped))


class IdReader:
    """A prepared text's ids read with plain file reads rather than through the map, and
    through a table (a model's ids): `charrnn eval` and the batches of training read a text
    of any size in bounded memory and time. A map's pages count in the process's resident
    memory once touched, and a fault on a map reads ahead far more than a window (up to a
    2 MB page-cache folio): on a 10 GB corpus not in the page cache, steps ran at 0.12x.
    Here the kernel is told the reads are random (no read-ahead), and each window is one
    pread. Supports len(), ids[a:b] and windows(starts, length)."""

    def __init__(self, path: Path, chars: int, dtype: torch.dtype, table: torch.Tensor | None = None,
                 offset: int = DATA_OFFSET):
        self.path, self.chars, self.dtype, self.table, self.offset = path, chars, dtype, table, offset
        self._handle = open(path, "rb")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._handle.fileno(), 0, 0, os.POSIX_FADV_RANDOM)

    def __len__(self) -> int:
        return self.chars

    def _read(self, start: int, count: int) -> torch.Tensor:
        raw = bytearray(os.pread(self._handle.fileno(), count * self.dtype.itemsize,
                                 self.offset + start * self.dtype.itemsize))
        ids = torch.frombuffer(raw, dtype=self.dtype) if raw else torch.zeros(0, dtype=self.dtype)
        return ids if self.table is None else self.table[ids.int()]

    def __getitem__(self, where: slice) -> torch.Tensor:
        start, stop, _ = where.indices(self.chars)
        return self._read(start, max(0, stop - start))

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """(len(starts), length): the ids from each start, as ids[starts[:, None] + arange(length)].
        The reads run side by side on a few threads (pread lets go of the GIL): on a corpus
        the page cache does not hold, each is a random read of the disk, and 32 of them one
        after the other cost more than a step."""
        if not len(starts):
            return torch.zeros(0, length, dtype=self.dtype)
        places = starts.tolist()
        if len(places) < 4:
            return torch.stack([self._read(s, length) for s in places])
        return torch.stack(list(thread_pool().map(lambda s: self._read(s, length), places)))

    def will_need(self, starts: torch.Tensor, length: int) -> None:
        """Tell the kernel the windows at starts come next (POSIX_FADV_WILLNEED): it starts
        reading them from the disk and returns, so the next batch's reads overlap this
        step's arithmetic instead of following it. A hint only: what windows() returns is
        the same with or without it."""
        if not hasattr(os, "posix_fadvise"):
            return
        size = self.dtype.itemsize
        for start in starts.tolist():
            os.posix_fadvise(self._handle.fileno(), self.offset + start * size, length * size, os.POSIX_FADV_WILLNEED)

    def chunks(self, size: int = READ_BYTES) -> Iterator[torch.Tensor]:
        for start in range(0, self.chars, size):
            yield self[start : start + size]

    def close(self) -> None:
        self._handle.close()


_POOLS: dict = {}


def thread_pool(threads: int = READ_THREADS):
    """A pool of threads, one per size asked for, made on first use."""
    if threads not in _POOLS:
        from concurrent.futures import ThreadPoolExecutor

        _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"charrnn-{threads}")
    return _POOLS[threads]


def reader_for(corpus: Prepared, ids: torch.Tensor) -> IdReader | None:
    """An IdReader over ids when they are (the start of) corpus's mapped file, else None."""
    if corpus.path is None or ids.device.type != "cpu" or len(corpus.ids) == 0:
        return None
    base = corpus.ids.untyped_storage().data_ptr()
    if ids.untyped_storage().data_ptr() != base or ids.dtype != corpus.ids.dtype:
        return None
    start = (ids.data_ptr() - corpus.ids.data_ptr()) // ids.element_size()
    return IdReader(corpus.path, len(ids), ids.dtype, offset=DATA_OFFSET + start * ids.element_size())


def ids_in(corpus: Prepared, vocab: Vocab, unknown: str = "error", on_notice: Callable[[str], None] | None = None):
    """The corpus's ids in vocab (a model's) for scoring, and how many unknown characters
    were dropped: an IdReader over its id file (bounded memory), or a tensor for a corpus
    in memory. unknown: "error" (DataError naming them, the most frequent first) or "skip"
    (dropped; the text without them is written to a temporary id file)."""
    table = vocab._lookup(corpus.vocab.chars).long()  # (V_corpus,) -1 where vocab lacks the character
    identity = IdReader(corpus.path, len(corpus.ids), corpus.ids.dtype, torch.arange(len(corpus.vocab))) \
        if corpus.path is not None else None
    source = identity.chunks() if identity else (corpus.ids[i : i + READ_BYTES] for i in range(0, len(corpus.ids), READ_BYTES))
    missing = table < 0
    dropped = 0
    if bool(missing.any()):
        counts = torch.zeros(len(corpus.vocab), dtype=torch.long)
        for part in source:
            counts += torch.bincount(part.long(), minlength=len(corpus.vocab))
        unknown_counts = counts * missing
        dropped = int(unknown_counts.sum())
    if not dropped:
        if identity is None:
            return table[corpus.ids.long()].to(vocab.dtype), 0
        identity.table = table.to(vocab.dtype)
        return identity, 0
    if unknown != "skip":
        order = [int(i) for i in unknown_counts.argsort(descending=True, stable=True) if unknown_counts[i] > 0]
        shown = ", ".join(f"{corpus.vocab.chars[i]!r} x{int(counts[i])}" for i in order[:12])
        rest = len(order) - 12
        raise DataError(f"{dropped} character(s) unknown to the model: {shown}{f' and {rest} more' if rest > 0 else ''}; "
                        "use --unknown skip to drop them")
    if identity is None:
        ids = table[corpus.ids.long()]
        return ids[ids >= 0].to(vocab.dtype), dropped
    kept = len(corpus.ids) - dropped
    handle = tempfile.NamedTemporaryFile(dir=corpus.path.parent, prefix=".known-", delete=False)
    try:
        with handle:
            handle.write(b"\0" * DATA_OFFSET)
            for part in identity.chunks():
                ids = table[part.long()]
                handle.write(ids_bytes(ids[ids >= 0].to(vocab.dtype)))
        reader = IdReader(Path(handle.name), kept, vocab.dtype, torch.arange(len(vocab), dtype=vocab.dtype))
    except OSError as err:
        raise DataError(f"cannot write the text's known characters to {corpus.path.parent}: {err.strerror}") from None
    finally:
        identity.close()
        Path(handle.name).unlink(missing_ok=True)  # the reader's open handle keeps the data
    return reader, dropped


def ids_bytes(ids: torch.Tensor) -> bytearray:
    """ids' bytes, in a buffer of their own (a writer thread may still hold the last one)."""
    buffer = bytearray(len(ids) * ids.element_size())
    if ids.numel():
        torch.frombuffer(buffer, dtype=ids.dtype).copy_(ids)
    return buffer

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

import codecs
import errno
import hashlib
import json
import os
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch

from charrnn.data.text import Corpus, Vocab, _hidden, _is_utf8, code_points, read_corpus
from charrnn.errors import DataError, UsageError, not_unicode

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

@dataclass
class _Source:
    given: str  # as named (the file, or the directory it was found in)
    path: Path
    size: int
    mtime_ns: int
    in_directory: bool  # a file found in a directory: skipped, not refused, when it is not text

    def identity(self) -> list:
        return [str(self.path.resolve()), self.size, self.mtime_ns]


def _sources(paths: list[str]) -> list[_Source]:
    found = []
    for given in paths:
        path = Path(given)
        try:
            os.fsencode(given)  # a name the file system can take: any bytes, but no lone surrogate
        except UnicodeEncodeError as err:
            raise not_unicode(given, err.start, "the corpus path") from None
        try:
            if path.is_dir():
                files = [p for p in sorted(path.rglob("*")) if p.is_file() and not _hidden(p, path)]
                if not files:
                    raise DataError(f"directory {given} holds no non-empty text files")
                found += [_stat(str(p), p, True) for p in files]
            elif not path.exists():
                raise DataError(f"{given} does not exist; check the path")
            elif not path.is_file():
                raise DataError(f"{given} is not a file")
            else:
                found.append(_stat(given, path, False))
        except PermissionError as err:
            raise DataError(f"cannot read {given}: {err.strerror}") from None
    return found


def _stat(given: str, path: Path, in_directory: bool) -> _Source:
    info = path.stat()
    return _Source(given, path, info.st_size, info.st_mtime_ns, in_directory)


def prepare(paths: list[str], encoding: str = "utf-8", *, stdin: BinaryIO | None = None, out: str | Path | None = None,
            on_progress: Progress | None = None, on_notice: Callable[[str], None] | None = None) -> Prepared:
    """The corpus of `paths` (files, directories, "-" for stdin, or one prepared .ids file)
    as mapped ids: reused from the cache when its sources are unchanged, else prepared.

    out: write the id file there (charrnn prepare -o) instead of the cache. Text in
    another encoding than UTF-8, and the embedded corpus (no paths), are encoded in memory.
    """
    notice = on_notice or (lambda message: None)
    if len(paths) == 1 and paths[0] != "-" and Path(paths[0]).suffix == SUFFIX and Path(paths[0]).is_file() \
            and is_id_file(paths[0]):
        return open_prepared(paths[0], [paths[0]])
    if not paths or not _is_utf8(encoding):
        return in_memory(read_corpus(paths, encoding, stdin=stdin))
    if "-" in paths:
        if paths != ["-"]:
            raise UsageError("standard input (-) is read alone, not with files")
        return _prepare_stdin(stdin or sys.stdin.buffer, out, on_progress, notice)
    sources = _sources(paths)
    name = Path(paths[0]).stem or Path(paths[0]).name or "corpus"
    identity = {"format": FORMAT, "sources": [s.identity() for s in sources]}
    if out is None:
        directory = _writable_cache(notice)
        target = directory / (hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32] + SUFFIX)
        if target.exists():
            try:
                header = read_header(target)
                if header.get("identity") == identity:
                    return open_prepared(target, list(paths))
            except DataError as err:
                notice(f"{err}; preparing it again")
    else:
        target = Path(out)
    header = {"name": name, "given": list(paths), "identity": identity}
    _write(target, lambda: _text_chunks(sources), sum(s.size for s in sources), header, on_progress,
           lambda: _check_unchanged(sources))
    return open_prepared(target, list(paths), reused=False)


def in_memory(corpus: Corpus) -> Prepared:
    """A corpus held in memory (the embedded one, converted encodings, a test's bytes) encoded there."""
    vocab = Vocab.from_data(corpus)
    return Prepared(corpus.name, list(corpus.sources), vocab, vocab.encode_data(corpus), corpus.sha256, corpus.size,
                    list(corpus.skipped))


def _writable_cache(notice: Callable[[str], None]) -> Path:
    directory = cache_dir() / "ids"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-")
        probe.close()
        return directory
    except OSError as err:
        fallback = Path(tempfile.gettempdir()) / f"charrnn-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "ids"
        fallback.mkdir(parents=True, exist_ok=True)
        notice(f"cache directory {directory} is not writable ({err.strerror}); using {fallback} "
               "(set CHARRNN_CACHE to choose)")
        return fallback


def _check_unchanged(sources: list[_Source]) -> None:
    for source in sources:
        info = source.path.stat()
        if (info.st_size, info.st_mtime_ns) != (source.size, source.mtime_ns):
            raise DataError(f"{source.path} changed while it was being prepared; run again once it is complete")


def _text_chunks(sources: list[_Source]) -> Iterator[tuple[_Source, bytes | None]]:
    """Each source's bytes in chunks, then (source, None) at its end."""
    for source in sources:
        try:
            with open(source.path, "rb", buffering=0) as handle:
                left = source.size  # no further than its size when listed, should it grow meanwhile
                while left > 0 and (block := handle.read(min(READ_BYTES, left))):
                    left -= len(block)
                    yield source, block
        except OSError as err:
            raise DataError(f"cannot read {source.given}: {err.strerror}") from None
        yield source, None


def _prepare_stdin(stream: BinaryIO, out, on_progress, notice) -> Prepared:
    """Standard input, spooled to a file beside the prepared one as it is read (it cannot be
    read twice), then prepared like a file; both are removed once mapped unless out is given."""
    directory = _writable_cache(notice) if out is None else Path(out).resolve().parent
    spool = tempfile.NamedTemporaryFile(dir=directory, prefix=".stdin-", delete=False)
    try:
        with spool:
            while block := stream.read(READ_BYTES):
                spool.write(block)
        source = _stat("standard input", Path(spool.name), False)
        target = Path(out) if out is not None else directory / (Path(spool.name).name + SUFFIX)
        header = {"name": "stdin", "given": ["-"], "identity": None}
        _write(target, lambda: _text_chunks([source]), source.size, header, on_progress, lambda: None)
        prepared = open_prepared(target, ["-"], reused=False)
        if out is None:
            target.unlink()  # the map keeps the data; nothing is left in the cache
        return prepared
    except OSError as err:
        raise DataError(f"cannot spool standard input: {err.strerror}") from None
    finally:
        Path(spool.name).unlink(missing_ok=True)


def _write(target: Path, chunks: Callable[[], Iterator], total: int, header: dict, on_progress: Progress | None,
           check_unchanged: Callable[[], None]) -> None:
    """Both passes, into a temporary name renamed to target when whole."""
    progress = on_progress or (lambda phase, done, total: None)
    counts, chars, digest, skipped, size = _count(chunks(), total, progress)
    if chars == 0:
        raise DataError(f"{header['given'][0]} is empty; give a text file with some content")
    vocab = Vocab("".join(chr(c) for c in counts.nonzero().flatten().tolist()))
    header = {"format": FORMAT, **header, "vocab": vocab.chars, "chars": chars, "bytes": size,
              "dtype": str(vocab.dtype).removeprefix("torch."), "sha256": digest, "skipped": skipped}
    # surrogateescape: a file name's bytes that are not UTF-8 written as they are, read back the same
    blob = json.dumps(header, ensure_ascii=False).encode("utf-8", "surrogateescape")
    if 12 + len(blob) > DATA_OFFSET:
        raise DataError(f"the corpus names too many files for one id file's header ({len(header['given'])}); "
                        "give their directory instead")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False)
    try:
        with handle:
            handle.write(MAGIC + struct.pack("<I", len(blob)) + blob)
            handle.write(b" " * (DATA_OFFSET - handle.tell()))
            written = _encode(chunks(), set(skipped), vocab, handle, total, progress)
            handle.flush()
            os.fsync(handle.fileno())
        if written != chars:
            raise DataError(f"{header['given'][0]} changed while it was being prepared; run again once it is complete")
        check_unchanged()
        os.chmod(handle.name, 0o666 & ~_umask())
        os.replace(handle.name, target)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DataError(f"no space left on the disk of {target.parent} while preparing the corpus; free some, "
                            "or set CHARRNN_CACHE (or -o) to a larger disk") from None
        raise DataError(f"cannot write {target}: {err.strerror}") from None
    finally:
        Path(handle.name).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _count(chunks: Iterator, total: int, progress: Progress):
    """First pass: each source checked (UTF-8, not binary, not empty), its characters
    counted by code point, the whole text hashed. Files of a directory that fail are
    skipped (their bytes leave no trace in the counts or the hash); a file named itself
    is refused."""
    counts = torch.zeros(UNICODE, dtype=torch.int64)
    digest = _Behind(hashlib.sha256())
    chars = size = done = 0
    skipped: list[str] = []
    current = None
    for source, block in chunks:
        if source is not current:  # a new source: its counts apart until it is known to be text
            current, failed, offset, local_chars = source, None, 0, 0
            ascii_counts, other_counts = torch.zeros(128, dtype=torch.int64), None
            before = digest.wait().copy()
            decoder = codecs.getincrementaldecoder("utf-8")()
        if block is None:  # the end of this source
            if failed is None and offset == 0:
                failed = f"{source.given} is empty; give a text file with some content"
            if failed is None:
                try:
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError:
                    failed = f"{source.given} is not valid UTF-8: it ends inside a character"
            if failed is not None:
                if not source.in_directory:
                    raise DataError(failed)
                skipped.append(str(source.path))
                digest.wait()
                digest = _Behind(before)
                continue
            counts[:128] += ascii_counts
            if other_counts is not None:
                counts += other_counts
            chars += local_chars
            size += offset
            continue
        done += len(block)
        progress("checking", done, total)
        if failed is not None:
            continue
        if offset == 0 and b"\x00" in block[: 1 << 16]:
            failed = f"{source.given} looks like a binary file (it contains NUL bytes), not text"
            continue
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(block)
        except UnicodeDecodeError as err:
            failed = (f"{source.given} is not valid UTF-8: first bad byte at offset {offset - pending + err.start}"
                      " (pass --encoding if it is in another encoding)")
            continue
        offset += len(block)
        digest.call("update", block)  # on a thread, while the block is counted here
        if block.isascii():
            ascii_counts += torch.bincount(torch.frombuffer(bytearray(block), dtype=torch.uint8), minlength=128)
            local_chars += len(block)
        else:
            if other_counts is None:
                other_counts = torch.zeros(UNICODE, dtype=torch.int64)
            other_counts += torch.bincount(code_points(text), minlength=UNICODE)
            local_chars += len(text)
    return counts, chars, digest.wait().hexdigest(), skipped, size


class _Behind:
    """One object whose calls run on a thread of their own, one at a time and in order,
    while the caller goes on: the hash of one block (hashlib lets go of the GIL) beside the
    counting of the next, the write of one block of ids beside the encoding of the next.
    wait() returns the object once every call has run, raising what a call raised."""

    def __init__(self, target):
        self.target, self._pending = target, None

    def call(self, method: str, *args) -> None:
        self.wait()
        self._pending = _pool(1).submit(getattr(self.target, method), *args)

    def wait(self):
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        return self.target


def _encode(chunks: Iterator, skipped: set[str], vocab: Vocab, handle, total: int, progress: Progress) -> int:
    """Second pass: the ids of every source not skipped, written to handle; returns how many."""
    codes = code_points(vocab.chars).long()
    ascii_table = torch.zeros(128, dtype=vocab.dtype)  # ASCII byte -> id (every byte of the text is in vocab)
    ascii_table[codes[codes < 128]] = torch.arange(len(vocab), dtype=vocab.dtype)[codes < 128]
    byte_table = bytes(ascii_table.tolist() + [0] * 128) if vocab.dtype == torch.uint8 else None
    writer = _Behind(handle)  # a block written while the next is encoded
    written = done = 0
    decoder = codecs.getincrementaldecoder("utf-8")()
    for source, block in chunks:
        if block is None:
            decoder = codecs.getincrementaldecoder("utf-8")()
            continue
        done += len(block)
        progress("encoding", done, total)
        if str(source.path) in skipped:
            continue
        if block.isascii() and not decoder.getstate()[0]:
            count = len(block)
            if byte_table is not None:  # one byte an id: bytes.translate, twice index_select's speed
                writer.call("write", block.translate(byte_table))
                written += count
                continue
            out = torch.empty(count, dtype=vocab.dtype)
            torch.index_select(ascii_table, 0, torch.frombuffer(bytearray(block), dtype=torch.uint8).int(), out=out)
        else:
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError:
                raise DataError(f"{source.given} changed while it was being prepared; run again once it is complete") \
                    from None
            out, _ = vocab.encode(text)
            count = len(out)
        writer.call("write", _bytes(out.to(vocab.dtype)))
        written += count
    writer.wait()
    return written


# -- scoring a prepared text with a model's vocabulary ------------------------------------------

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
        return torch.stack(list(_pool().map(lambda s: self._read(s, length), places)))

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


def _pool(threads: int = READ_THREADS):
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
                handle.write(_bytes(ids[ids >= 0].to(vocab.dtype)))
        reader = IdReader(Path(handle.name), kept, vocab.dtype, torch.arange(len(vocab), dtype=vocab.dtype))
    except OSError as err:
        raise DataError(f"cannot write the text's known characters to {corpus.path.parent}: {err.strerror}") from None
    finally:
        identity.close()
        Path(handle.name).unlink(missing_ok=True)  # the reader's open handle keeps the data
    return reader, dropped


def _bytes(ids: torch.Tensor) -> bytearray:
    """ids' bytes, in a buffer of their own (a writer thread may still hold the last one)."""
    buffer = bytearray(len(ids) * ids.element_size())
    if ids.numel():
        torch.frombuffer(buffer, dtype=ids.dtype).copy_(ids)
    return buffer

"""Preparing a corpus: its sources streamed through two passes (check, count and hash;
then encode) into an id file (the format: charrnn.data.prepared), written atomically into
the cache or where asked, from files, directories or stdin."""

from __future__ import annotations

import codecs
import errno
import hashlib
import json
import os
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch

import charrnn.data.prepared  # its READ_BYTES read at each pass (tests set it)
from charrnn.data.prepared import (
    DATA_OFFSET,
    FORMAT,
    MAGIC,
    SUFFIX,
    UNICODE,
    Prepared,
    Progress,
    cache_dir,
    ids_bytes,
    in_memory,
    is_id_file,
    open_prepared,
    read_header,
    thread_pool,
)
from charrnn.data.text import Vocab, _hidden, _is_utf8, code_points, read_corpus
from charrnn.errors import DataError, UsageError, not_unicode


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
                while left > 0 and (block := handle.read(min(charrnn.data.prepared.READ_BYTES, left))):
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
            while block := stream.read(charrnn.data.prepared.READ_BYTES):
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
        self._pending = thread_pool(1).submit(getattr(self.target, method), *args)

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
        writer.call("write", ids_bytes(out.to(vocab.dtype)))
        written += count
    writer.wait()
    return written


# -- scoring a prepared text with a model's vocabulary ------------------------------------------


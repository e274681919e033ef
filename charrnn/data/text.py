"""Corpora and the character vocabulary.

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

#!/usr/bin/env python3
"""Build the test corpora every machine has, reproducibly, without downloading anything.

    python scripts/corpora.py [DIR]        # default DIR: /tmp/charrnn-corpora

Writes (and prints the path, size and sha256 of) three texts, each a different kind:

  pydocs.txt    the embedded default corpus: Python's reference docs (pydoc_data.topics)
  pysource.txt  Python source code: the running interpreter's standard library .py files
                (test suites, idlelib and site-packages left out), sorted by path, each
                prefixed by a "# file: NAME" line, the first 5 MB
  prose.txt     English technical prose: the docstrings and comments of those same files,
                in file order, paragraphs separated by a blank line (several MB)

The same Python version gives the same bytes (the sha256 printed makes that checkable).
Tiny Shakespeare comes from ../shared/data/ and is not built here.
"""

from __future__ import annotations

import ast
import hashlib
import io
import sys
import sysconfig
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charrnn.data.text import embedded_corpus  # noqa: E402

SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "site-packages", "__pycache__"}
SOURCE_BYTES = 5_000_000


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))


def source_text(files: list[Path]) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in files:
        text = _read(path)
        if text is None:
            continue
        piece = f"# file: {path.relative_to(root)}\n{text.rstrip()}\n\n"
        size += len(piece.encode("utf-8"))
        if size > SOURCE_BYTES:
            break
        parts.append(piece)
    return "".join(parts)


def prose_text(files: list[Path]) -> str:
    """Docstrings (dedented by ast) and runs of comment lines, as paragraphs."""
    paragraphs = []
    for path in files:
        text = _read(path)
        if text is None:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    paragraphs.append(doc.strip())
        paragraphs.extend(_comment_blocks(text))
    return "\n\n".join(paragraphs) + "\n"


def _comment_blocks(text: str) -> list[str]:
    blocks, current, last_line = [], [], -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type != tokenize.COMMENT or tok.string.startswith("#!"):
                continue
            words = tok.string.lstrip("#").strip()
            if tok.start[0] != last_line + 1 and current:
                blocks.append(" ".join(current))
                current = []
            if words:
                current.append(words)
            last_line = tok.start[0]
    except (tokenize.TokenError, SyntaxError):
        pass
    if current:
        blocks.append(" ".join(current))
    return [b for b in blocks if len(b) > 40]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def build(directory: str | Path) -> dict[str, Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = stdlib_files()
    texts = {
        "pydocs": embedded_corpus().data.decode("utf-8"),
        "pysource": source_text(files),
        "prose": prose_text(files),
    }
    paths = {}
    for name, text in texts.items():
        path = out / f"{name}.txt"
        data = text.encode("utf-8")
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
        paths[name] = path
    return paths


def main() -> None:
    directory = sys.argv[1] if len(sys.argv) > 1 else "/tmp/charrnn-corpora"
    for name, path in build(directory).items():
        data = path.read_bytes()
        print(f"{name:9s} {path}  {len(data):>10,} bytes  sha256 {hashlib.sha256(data).hexdigest()[:16]}")


if __name__ == "__main__":
    main()

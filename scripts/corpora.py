#!/usr/bin/env python3
"""Build the test corpora every machine has, reproducibly, without downloading anything.

    python scripts/corpora.py [DIR [NAME ...]]   # default DIR: /tmp/charrnn-corpora

Writes (and prints the path, size and sha256 of) three texts, each a different kind:

  pydocs.txt    the embedded default corpus: Python's reference docs (pydoc_data.topics)
  pysource.txt  Python source code: the running interpreter's standard library .py files
                (test suites, idlelib and site-packages left out), sorted by path, each
                prefixed by a "# file: NAME" line, the first 5 MB
  prose.txt     English technical prose: the docstrings and comments of those same files,
                in file order, paragraphs separated by a blank line (several MB)

and, only when asked by name (rendering takes ~10 s) and where the machine has them, one
non-English text:

  german.txt    German technical prose: the German manual pages installed under
                /usr/share/man/de (Debian's dpkg, apt, man-db, procps...), rendered by
                man-db at 80 columns without justification or hyphenation, sorted by path

The same Python version gives the same bytes, and german.txt the same installed pages (the
sha256 printed makes that checkable).
Tiny Shakespeare comes from ../shared/data/ and is not built here.
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charrnn.data.text import embedded_corpus  # noqa: E402

SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "site-packages", "__pycache__"}
SOURCE_BYTES = 5_000_000
MAN_PAGES = Path("/usr/share/man/de")


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


def manual_text(root: Path = MAN_PAGES) -> str:
    """The manual pages under root, rendered as a terminal shows them (col -bx strips the
    overstrikes), one after another; "" where there are none or no man-db to render them."""
    if not root.is_dir() or not shutil.which("man") or not shutil.which("col"):
        return ""
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    pages = []
    for page in sorted(root.glob("man*/*")):
        man = subprocess.Popen(["man", "--no-justification", "--no-hyphenation", "--encoding=UTF-8", "-l", str(page)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        shown = subprocess.run(["col", "-bx"], stdin=man.stdout, capture_output=True, env=env)
        man.stdout.close()
        text = shown.stdout.decode("utf-8", errors="replace").strip()
        if man.wait() == 0 and text:
            pages.append(text + "\n")
    return "\n\n".join(pages)


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


# Each text from the standard library's files; german is built only when named.
MAKERS = {
    "pydocs": lambda files: embedded_corpus().data.decode("utf-8"),
    "pysource": source_text,
    "prose": prose_text,
    "german": lambda files: manual_text(MAN_PAGES),
}
TEXTS = tuple(MAKERS)
BUILT = TEXTS[:3]  # what build() writes unless given names


def build(directory: str | Path, names: tuple[str, ...] = BUILT) -> dict[str, Path]:
    """Write the named texts into directory and return their paths; a text this machine
    cannot build (german.txt without German manual pages) is left out."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = stdlib_files()
    paths = {}
    for name in names:
        text = MAKERS[name](files)
        if not text:
            continue
        path = out / f"{name}.txt"
        data = text.encode("utf-8")
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
        paths[name] = path
    return paths


def main() -> None:
    directory = sys.argv[1] if len(sys.argv) > 1 else "/tmp/charrnn-corpora"
    names = tuple(sys.argv[2:]) or BUILT
    unknown = [name for name in names if name not in TEXTS]
    if unknown:
        print(f"usage: corpora.py [DIR [NAME ...]]: no text named {unknown[0]!r}; the texts are {', '.join(TEXTS)}",
              file=sys.stderr)
        sys.exit(2)
    built = build(directory, names)
    for name in names:
        if name not in built:
            print(f"{name:9s} not built: this machine has no {MAN_PAGES} or no man-db to render it", file=sys.stderr)
    for name, path in built.items():
        data = path.read_bytes()
        print(f"{name:9s} {path}  {len(data):>10,} bytes  sha256 {hashlib.sha256(data).hexdigest()[:16]}")


if __name__ == "__main__":
    main()

"""scripts/corpora.py's non-English text: German manual pages, rendered as a terminal shows them."""

import gzip
import importlib
import shutil
import sys
from pathlib import Path

import pytest

PAGE = r""".TH PRÜFUNG 1 "2026-12-07" "charrnn" "Testseite"
.SH BEZEICHNUNG
prüfung \- eine \fBfette\fR Überschrift für Größen
.SH BESCHREIBUNG
Dieser Absatz ist lang genug, damit das Satzprogramm ihn umbricht, und er enthält
die Wörter \fIÄrger\fR, \fBÖl\fR und Straße in Auszeichnung und ohne.
"""


def _corpora():
    scripts = str(Path(__file__).resolve().parent.parent / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("corpora")


@pytest.mark.skipif(not (shutil.which("man") and shutil.which("col")), reason="man-db is not installed")
def test_a_manual_page_is_rendered_as_plain_utf8_text(tmp_path):
    (tmp_path / "man1").mkdir()
    (tmp_path / "man1" / "pruefung.1.gz").write_bytes(gzip.compress(PAGE.encode("utf-8")))
    text = _corpora().manual_text(tmp_path)
    assert "BEZEICHNUNG" in text and "Überschrift für Größen" in text
    words = " ".join(text.split())  # the page is filled to 80 columns: the words, not the lines
    assert "die Wörter Ärger, Öl und Straße in Auszeichnung und ohne." in words
    assert "\b" not in text and "\\f" not in text and ".SH" not in text  # no overstrikes, no troff left
    assert max(len(line) for line in text.splitlines()) <= 80


def test_a_machine_without_manual_pages_builds_the_other_texts(tmp_path, monkeypatch):
    corpora = _corpora()
    monkeypatch.setattr(corpora, "MAN_PAGES", tmp_path / "absent")
    assert corpora.manual_text(tmp_path / "absent") == ""
    built = corpora.build(tmp_path / "out", ("pydocs", "german"))
    assert built.keys() == {"pydocs"} and not (tmp_path / "out" / "german.txt").exists()

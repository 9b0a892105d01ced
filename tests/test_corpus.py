"""The embedded corpus: files match their recorded SHA-256, a corrupted copy is refused, and the text has the
documented shape (blank line between documents, no empty document)."""
import hashlib
import lzma
import shutil

import pytest

from electra_ext.data import corpus


def test_files_match_the_manifest():
    entries = corpus.embedded_corpus_manifest()
    paths = corpus.embedded_corpus_files()
    assert len(paths) == len(entries) == 2
    for path, entry in zip(paths, entries):
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"]
        with lzma.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
        assert len(text.encode("utf-8")) == entry["bytes"]
        documents = text.strip("\n").split("\n\n")
        assert len(documents) == entry["documents"]
        assert all(document.strip() for document in documents)
        assert sum(len(document.split("\n")) for document in documents) == entry["lines"]


def test_a_corrupted_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "corpus"
    shutil.copytree(corpus.CORPUS_DIR, copy)
    first = corpus.embedded_corpus_manifest()[0]["file"]
    with open(copy / first, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    monkeypatch.setattr(corpus, "CORPUS_DIR", str(copy))
    with pytest.raises(ValueError, match="installation is corrupted"):
        corpus.embedded_corpus_files()

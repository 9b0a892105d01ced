"""Corpora as users have them: binary files, empty files, text that is not UTF-8 and absurdly long lines are
skipped with a count in one warning (and in the token cache's manifest), never a crash, and a long line is
never held in memory whole."""
import gzip
import json
import tracemalloc

import pytest

from electra_ext.data.sources import MAX_LINE_CHARS, SkippedInput, iter_documents
from electra_ext.data.token_cache import TokenCache
from electra_ext.data.tokenizer import load_tokenizer

LONG_LINE = "x" * (MAX_LINE_CHARS + 1)


@pytest.fixture
def messy_corpus(tmp_path):
    """A directory of good text among what users' corpora also hold; files read in sorted order."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a_good.txt").write_text("first line\nsecond line\n\nnext document\n", encoding="utf-8")
    (corpus / "b_empty.txt").write_bytes(b"")
    (corpus / "c_blank.txt").write_text(" \n\n\t\n", encoding="utf-8")
    (corpus / "d_image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    (corpus / "e_utf16.txt").write_text("text saved as UTF-16\n", encoding="utf-16")
    (corpus / "f_latin1.txt").write_bytes("good line\ncaf\xe9 au lait\nlast line\n".encode("latin-1"))
    with gzip.open(corpus / "g_long.txt.gz", "wt", encoding="utf-8") as file:
        file.write(f"before\n{LONG_LINE}\nafter\n")
    records = [json.dumps({"text": "a record"}).encode(), b'{"text": "caf\xe9"}',
               json.dumps({"text": f"kept\n{LONG_LINE}\nkept too"}).encode()]
    (corpus / "h_records.jsonl").write_bytes(b"\n".join(records) + b"\n")
    return corpus


EXPECTED_DOCUMENTS = [["first line", "second line"], ["next document"], ["good line", "last line"],
                      ["before", "after"], ["a record"], ["kept", "kept too"]]


def test_unreadable_content_is_skipped_and_counted(messy_corpus, warnings_of):
    assert list(iter_documents(messy_corpus)) == EXPECTED_DOCUMENTS
    assert warnings_of == [
        f"skipped while reading {messy_corpus}: "
        f"2 binary files (NUL bytes and bytes that are not UTF-8 in the first 8,000) "
        f"(first: {messy_corpus / 'd_image.png'}), "
        f"2 empty files (first: {messy_corpus / 'b_empty.txt'}), "
        f"2 lines that are not UTF-8 (first: {messy_corpus / 'f_latin1.txt'}, line 2), "
        f"2 lines longer than 1,000,000 characters (first: {messy_corpus / 'g_long.txt.gz'}, line 2)"]
    skipped = SkippedInput()
    list(iter_documents(messy_corpus / "f_latin1.txt", skipped=skipped))
    assert skipped.counts == {"invalid_utf8_lines": 1}
    assert len(warnings_of) == 1  # a caller that passes `skipped` reports it


def test_the_token_cache_records_and_reports_what_was_skipped(messy_corpus, tmp_path, warnings_of):
    tokenizer = load_tokenizer()
    cache = TokenCache.build([str(messy_corpus)], tokenizer, tmp_path / "cache", num_workers=1)
    assert cache.num_documents == len(EXPECTED_DOCUMENTS)
    assert {kind: entry["count"] for kind, entry in cache.manifest["skipped"].items()} == {
        "binary_files": 2, "empty_files": 2, "invalid_utf8_lines": 2, "long_lines": 2}
    reused = TokenCache.build([str(messy_corpus)], tokenizer, tmp_path / "cache", num_workers=1)
    assert reused.path == cache.path
    assert len(warnings_of) == 2  # built, then reused: each time
    assert all(message.startswith(f"the corpus of token cache {cache.path} skipped 2 binary files")
               for message in warnings_of)


def test_a_line_without_end_is_read_in_bounded_memory(tmp_path):
    """A 30 MB file with no newline (a dump, a minified file) is skipped having held at most a few MB."""
    path = tmp_path / "dump.txt"
    path.write_text("y" * 30_000_000 + "\nthe end\n", encoding="utf-8")
    skipped = SkippedInput()
    tracemalloc.start()
    try:
        documents = list(iter_documents(path, skipped=skipped))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert documents == [["the end"]]
    assert skipped.counts == {"long_lines": 1}
    assert peak < 8 * MAX_LINE_CHARS  # bytes: a few line-sized chunks, not the 30 MB line

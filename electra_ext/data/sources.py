"""Reading pre-training corpora as documents (lists of lines), streamed so that corpus size never shows in
memory, and fingerprinting them by content for cache keys.

Formats, told apart by name:
- plain text (`*`, `*.gz`, `*.xz`): one sentence or line per line, a blank line between documents (the BERT
  and ELECTRA corpus format);
- JSONL (`*.jsonl`, `*.jsonl.gz`, `*.jsonl.xz`): one JSON object per line whose `text_field` is a document,
  split into lines at newlines;
- a directory of such files, read in the order of their sorted relative paths, hidden files and directories
  (names starting with ".") skipped;
- an HF `datasets` dataset written by `save_to_disk` (a directory with dataset_info.json or state.json; for a
  DatasetDict, with dataset_dict.json, its "train" split), each row's `text_field` a document.
Lines are stripped of surrounding whitespace and blank ones dropped, so no document has an empty line and no
document is empty.

What a user's corpus may hold besides text is skipped, counted and reported in one warning per corpus (logger
`electra_ext.data.sources`; `SkippedInput` carries the counts to callers) rather than failing a long build:
binary files (NUL bytes among bytes that are not UTF-8 in their first BINARY_SNIFF_BYTES bytes; UTF-16 text
with a byte-order mark counts too), empty files, lines that are not valid UTF-8, and lines longer than
MAX_LINE_CHARS characters. What is not a corpus at all still fails: a missing path, a corrupt .gz/.xz, a JSONL
line that is not JSON.
"""
import codecs
import gzip
import hashlib
import itertools
import json
import logging
import lzma
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Optional

logger = logging.getLogger(__name__)

# Files that mark a directory as a `datasets` save_to_disk output: a Dataset writes the first two, a
# DatasetDict the third (with one Dataset directory per split).
DATASET_MARKERS = ("dataset_info.json", "state.json")
DATASET_DICT_MARKER = "dataset_dict.json"
DATASET_DICT_SPLIT = "train"
# Rows fetched from a `datasets` dataset at a time: 1,000 rows of text keep memory to a few MB.
DATASET_BATCH_ROWS = 1000
# Bytes hashed at a time by describe_source.
HASH_CHUNK_BYTES = 1 << 20
COMPRESSIONS = {".gz": gzip.open, ".xz": lzma.open}
# What a corrupt or truncated compressed file raises while it is read.
CORRUPT_COMPRESSED_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError)
# Bytes (decompressed) looked at to tell a binary file: git and grep look at the first 8,000 for a NUL byte. A
# NUL alone is not enough here, as text corpora do carry stray control characters (BERT's cleaning deletes
# them), so the bytes must also fail to decode as UTF-8, which images, archives and tensors all do at once.
BINARY_SNIFF_BYTES = 8000
# Prose comes in lines (paragraphs) of at most a few thousand characters; a line of over a million is minified
# data, base64 or a file without newlines, and the example builder would keep only its first max_seq_length
# (at most 512) of its ~250,000 tokens anyway. Reading stops at this many characters per line, so such a line
# never sits in memory whole.
MAX_LINE_CHARS = 1_000_000
# A JSONL line is a whole document (a book is a few million characters); longer records are skipped like
# long lines, bounding the memory one record can take.
MAX_RECORD_CHARS = 100_000_000
# Undecodable bytes read with errors="surrogateescape" become these code points, which valid UTF-8 never gives.
ESCAPED_BYTES = re.compile("[\udc80-\udcff]")


class SkippedInput:
    """What the readers skipped (see the module docstring): a count per kind and where the first one was."""

    KINDS = {"binary_files": "binary file{s} (NUL bytes and bytes that are not UTF-8 in the first 8,000)",
             "empty_files": "empty file{s}",
             "invalid_utf8_lines": "line{s} that {are} not UTF-8",
             "long_lines": f"line{{s}} longer than {MAX_LINE_CHARS:,} characters",
             "long_records": f"JSONL record{{s}} longer than {MAX_RECORD_CHARS:,} characters"}

    def __init__(self):
        self.counts = Counter()
        self.first = {}

    def add(self, kind: str, where: str):
        self.counts[kind] += 1
        self.first.setdefault(kind, where)

    def as_dict(self) -> dict:
        return {kind: {"count": self.counts[kind], "first": self.first[kind]} for kind in self.KINDS
                if self.counts[kind]}

    @staticmethod
    def describe(skipped: dict) -> str:
        """'3 lines that are not UTF-8 (first: a.txt, line 7), 1 empty file (first: b.txt)' for as_dict()."""
        parts = []
        for kind, entry in skipped.items():
            plural = entry["count"] != 1
            noun = SkippedInput.KINDS[kind].format(s="s" if plural else "", are="are" if plural else "is")
            parts.append(f"{entry['count']:,} {noun} (first: {entry['first']})")
        return ", ".join(parts)

    def report(self, what: str):
        """Logs one warning naming the counts, if anything was skipped."""
        if self.counts:
            logger.warning("skipped while reading %s: %s", what, self.describe(self.as_dict()))


def _file_format(path: str) -> str:
    """The format of a file, from its name: "text" or "jsonl", followed by ".gz" or ".xz" when compressed."""
    stem, compression = os.path.splitext(path)
    if compression.lower() not in COMPRESSIONS:
        stem, compression = path, ""
    kind = "jsonl" if stem.lower().endswith(".jsonl") else "text"
    return kind + compression.lower()


def _source_format(path: str) -> str:
    """The format of the source at `path`: a file format (see _file_format), "directory" or "datasets"."""
    if os.path.isdir(path):
        markers = DATASET_MARKERS + (DATASET_DICT_MARKER,)
        return "datasets" if any(os.path.isfile(os.path.join(path, name)) for name in markers) else "directory"
    if os.path.isfile(path):
        return _file_format(path)
    raise FileNotFoundError(f"source {path} does not exist; expected a text or JSONL file, a directory of them "
                            "or a `datasets` save_to_disk directory")


def _directory_files(directory: str) -> list:
    """The files under `directory`, recursively, hidden ones and those in hidden directories left out, sorted
    by relative path."""
    files = []
    for root, subdirectories, names in os.walk(directory):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        files.extend(os.path.join(root, name) for name in names if not name.startswith("."))
    return sorted(files, key=lambda path: os.path.relpath(path, directory))


def _is_binary(head: bytes) -> bool:
    """Whether the first BINARY_SNIFF_BYTES of a file show it to be binary (see BINARY_SNIFF_BYTES)."""
    if b"\0" not in head:
        return False
    try:  # incremental, so that a character cut by the end of `head` is not an error
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return True
    return False


def _numbered_lines(path: str, skipped: SkippedInput, max_chars: int = MAX_LINE_CHARS,
                    long_kind: str = "long_lines") -> Iterator:
    """(line number from 1, line stripped of surrounding whitespace) for each line of the text file at `path`,
    decompressing .gz and .xz, read in buffered chunks rather than whole. Binary and empty files, lines that
    are not UTF-8 and lines of over `max_chars` characters are skipped into `skipped` (as `long_kind`)."""
    opener = COMPRESSIONS.get(os.path.splitext(path)[1].lower(), open)
    number = 0
    try:
        with opener(path, "rb") as file:
            head = file.read(BINARY_SNIFF_BYTES)
        if _is_binary(head):
            skipped.add("binary_files", path)
            return
        lines_skipped, has_text = 0, False
        with opener(path, "rt", encoding="utf-8", errors="surrogateescape") as file:
            while line := file.readline(max_chars + 1):
                number += 1
                if len(line) > max_chars and not line.endswith("\n"):
                    while (rest := file.readline(max_chars)) and not rest.endswith("\n"):
                        pass
                    skipped.add(long_kind, f"{path}, line {number}")
                    lines_skipped += 1
                elif ESCAPED_BYTES.search(line):
                    skipped.add("invalid_utf8_lines", f"{path}, line {number}")
                    lines_skipped += 1
                else:
                    line = line.strip()
                    has_text = has_text or bool(line)
                    yield number, line
        if not has_text and not lines_skipped:  # nothing but whitespace, if anything
            skipped.add("empty_files", path)
    except CORRUPT_COMPRESSED_ERRORS as error:
        raise ValueError(f"source {path} is not a valid {_file_format(path)} file: {error} after line "
                         f"{number}") from None


def _text_lines(text: str, skipped: SkippedInput, where: str) -> list:
    """The non-blank lines of one document's text, stripped, lines of over MAX_LINE_CHARS skipped."""
    lines = []
    for line in text.split("\n"):
        if len(line) > MAX_LINE_CHARS:
            skipped.add("long_lines", where)
        elif line := line.strip():
            lines.append(line)
    return lines


def _checked_text(value, text_field: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: text_field {text_field!r} is {type(value).__name__}, expected a string")
    return value


def _text_documents(path: str, skipped: SkippedInput) -> Iterator:
    document = []
    for _, line in _numbered_lines(path, skipped):
        if line:
            document.append(line)
        elif document:
            yield document
            document = []
    if document:
        yield document


def _jsonl_documents(path: str, text_field: str, skipped: SkippedInput) -> Iterator:
    for number, line in _numbered_lines(path, skipped, MAX_RECORD_CHARS, "long_records"):
        if not line:
            continue
        where = f"source {path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict) or text_field not in record:
            fields = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: expected an object with text_field {text_field!r}, got {fields}")
        document = _text_lines(_checked_text(record[text_field], text_field, where), skipped, where)
        if document:
            yield document


def _dataset_directory(path: str) -> str:
    """The directory of the Dataset that a save_to_disk directory holds: itself, or a DatasetDict's "train"."""
    if not os.path.isfile(os.path.join(path, DATASET_DICT_MARKER)):
        return path
    with open(os.path.join(path, DATASET_DICT_MARKER), encoding="utf-8") as file:
        splits = json.load(file).get("splits", [])
    if DATASET_DICT_SPLIT not in splits:
        raise ValueError(f"source {path} is a DatasetDict without a {DATASET_DICT_SPLIT!r} split (it has "
                         f"{', '.join(map(repr, splits)) or 'none'})")
    return os.path.join(path, DATASET_DICT_SPLIT)


def _dataset_documents(path: str, text_field: str, skipped: SkippedInput) -> Iterator:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"source {path} is a `datasets` directory, which needs the datasets package: "
                          "pip install datasets") from None
    # load_from_disk memory-maps the Arrow files; reading DATASET_BATCH_ROWS rows of one column at a time
    # never materialises the dataset.
    dataset = datasets.load_from_disk(_dataset_directory(path))
    if text_field not in dataset.column_names:
        raise ValueError(f"source {path} has no text_field {text_field!r}; its columns are "
                         f"{', '.join(map(repr, dataset.column_names))}")
    row = 0
    for batch in dataset.select_columns([text_field]).iter(batch_size=DATASET_BATCH_ROWS):
        for value in batch[text_field]:
            where = f"source {path}, row {row}"
            document = _text_lines(_checked_text(value, text_field, where), skipped, where)
            if document:
                yield document
            row += 1


def _file_documents(path: str, text_field: str, skipped: SkippedInput) -> Iterator:
    if _file_format(path).startswith("jsonl"):
        return _jsonl_documents(path, text_field, skipped)
    return _text_documents(path, skipped)


def _reported(documents: Iterator, skipped: SkippedInput, what: str) -> Iterator:
    yield from documents
    skipped.report(what)


def iter_documents(path: str | os.PathLike, text_field: str = "text",
                   skipped: Optional[SkippedInput] = None) -> Iterator:
    """Documents of the corpus at `path` (see the module docstring for formats), in order, each a non-empty
    list of non-empty lines; `text_field` names the text of a JSONL record or a dataset row. A document never
    spans two files. A missing `path` raises here rather than at the first document. What is skipped goes
    into `skipped`; without one, a warning reports it once the documents are exhausted."""
    path = os.fspath(path)
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
    source_format = _source_format(path)
    report = skipped is None
    skipped = SkippedInput() if report else skipped
    if source_format == "datasets":
        documents = _dataset_documents(path, text_field, skipped)
    else:
        files = _directory_files(path) if source_format == "directory" else [path]
        documents = itertools.chain.from_iterable(_file_documents(file, text_field, skipped) for file in files)
    return _reported(documents, skipped, path) if report else documents


def iter_lines(path: str | os.PathLike, text_field: str = "text", skipped: Optional[SkippedInput] = None) -> Iterator:
    """The lines of every document of the corpus at `path`, in order (what tokenizer training reads)."""
    for document in iter_documents(path, text_field, skipped):
        yield from document


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def describe_source(path: str | os.PathLike) -> dict:
    """What the corpus at `path` is, for cache keys: {"path", "format", "files", "size", "sha256"}. For a file,
    sha256 is that of its bytes (what `sha256sum` prints); for a directory, of each file's relative path and
    SHA-256 in reading order; for a `datasets` directory, the same over the Arrow files of the split read. Every
    byte is read, about 1 s per GB, so an edited corpus is never mistaken for the cached one."""
    path = os.fspath(path)
    source_format = _source_format(path)
    if source_format in ("directory", "datasets"):
        if source_format == "directory":
            root = path
            files = _directory_files(root)
        else:
            root = _dataset_directory(path)
            files = [file for file in _directory_files(root) if file.endswith(".arrow")]
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{os.path.relpath(file, root)}\0{file_sha256(file)}\n".encode("utf-8"))
        sha256 = digest.hexdigest()
    else:
        files = [path]
        sha256 = file_sha256(path)
    return {"path": os.path.abspath(path), "format": source_format, "files": len(files),
            "size": sum(os.path.getsize(file) for file in files), "sha256": sha256}

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
"""
import gzip
import hashlib
import itertools
import json
import lzma
import os
import zlib
from collections.abc import Iterator

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


def _numbered_lines(path: str) -> Iterator:
    """(line number from 1, line stripped of surrounding whitespace) for each line of the text file at `path`,
    decompressing .gz and .xz, read in buffered chunks rather than whole."""
    opener = COMPRESSIONS.get(os.path.splitext(path)[1].lower(), open)
    number = 0
    with opener(path, "rt", encoding="utf-8") as file:
        try:
            for number, line in enumerate(file, 1):
                yield number, line.strip()
        except UnicodeDecodeError as error:
            raise ValueError(f"source {path} is not UTF-8 text: {error.reason} after line {number}") from None
        except CORRUPT_COMPRESSED_ERRORS as error:
            raise ValueError(f"source {path} is not a valid {_file_format(path)} file: {error} after line "
                             f"{number}") from None


def _text_lines(text) -> list:
    """The non-blank lines of one document's text, stripped."""
    return [line for line in (line.strip() for line in text.split("\n")) if line]


def _checked_text(value, text_field: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: text_field {text_field!r} is {type(value).__name__}, expected a string")
    return value


def _text_documents(path: str) -> Iterator:
    document = []
    for _, line in _numbered_lines(path):
        if line:
            document.append(line)
        elif document:
            yield document
            document = []
    if document:
        yield document


def _jsonl_documents(path: str, text_field: str) -> Iterator:
    for number, line in _numbered_lines(path):
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
        document = _text_lines(_checked_text(record[text_field], text_field, where))
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


def _dataset_documents(path: str, text_field: str) -> Iterator:
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
            document = _text_lines(_checked_text(value, text_field, f"source {path}, row {row}"))
            if document:
                yield document
            row += 1


def _file_documents(path: str, text_field: str) -> Iterator:
    if _file_format(path).startswith("jsonl"):
        return _jsonl_documents(path, text_field)
    return _text_documents(path)


def iter_documents(path: str | os.PathLike, text_field: str = "text") -> Iterator:
    """Documents of the corpus at `path` (see the module docstring for formats), in order, each a non-empty
    list of non-empty lines; `text_field` names the text of a JSONL record or a dataset row. A document never
    spans two files. A missing `path` raises here rather than at the first document."""
    path = os.fspath(path)
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
    source_format = _source_format(path)
    if source_format == "datasets":
        return _dataset_documents(path, text_field)
    files = _directory_files(path) if source_format == "directory" else [path]
    return itertools.chain.from_iterable(_file_documents(file, text_field) for file in files)


def iter_lines(path: str | os.PathLike, text_field: str = "text") -> Iterator:
    """The lines of every document of the corpus at `path`, in order (what tokenizer training reads)."""
    for document in iter_documents(path, text_field):
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

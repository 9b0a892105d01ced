"""Tokenising a corpus once into a cache of token shards that pre-training reads through memory maps.

A cache lives in `cache_root/<key>/`, where the key is the SHA-256 of what decides its contents (the cache
format, the tokenizer, each source's content and the text field), so an edited corpus or another vocabulary
gets a new cache and an unchanged one is reused. Shard n consists of:
- tokens_n.u16: the token ids of its lines, concatenated (little-endian uint16);
- lines_n.i64: the end offset of each line in tokens_n (little-endian int64), line k spanning
  [lines[k - 1] (0 for k = 0), lines[k]);
- docs_n.i64: the index of each document's first line in lines_n, a document running to the next one's first
  line (the last to the end of the shard).
Documents never straddle shards; lines that tokenise to nothing and documents left with no line are dropped.
complete.json, written last, records the counts and what reading the corpus skipped (see sources.py), which
every build or reuse reports in a warning; a cache is built in a hidden directory beside its key and renamed
into place, so a directory named by a key is always complete (a killed build leaves only a hidden
`.<key>.*.building` directory, safe to delete).
"""
import collections
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile

import numpy as np
from tokenizers import Tokenizer

from electra_ext._io import atomic_output
from electra_ext.data.sources import SkippedInput, describe_source, iter_documents
from electra_ext.data.tokenizer import tokenizer_fingerprint

logger = logging.getLogger(__name__)
# Changes whenever the layout or the tokenisation rules change, so that old caches are not reused (2: binary
# files, non-UTF-8 lines and lines over sources.MAX_LINE_CHARS are skipped, no longer fatal or kept).
FORMAT_VERSION = 2
MARKER = "complete.json"
TOKEN_DTYPE = np.dtype("<u2")
OFFSET_DTYPE = np.dtype("<i8")
# uint16 holds ids 0..65,535.
MAX_VOCAB_SIZE = 1 << 16
# Lines per encode_batch call: 1,000 lines (about 30k tokens of Wikipedia) keep Rust's threads busy while the
# batch and its Encoding objects stay at a few MB.
BATCH_LINES = 1000
# Batches queued per worker process: enough to keep workers fed, few enough to bound memory.
BATCHES_IN_FLIGHT_PER_WORKER = 2


def _shard_file(directory: str, kind: str, shard: int) -> str:
    extension = {"tokens": "u16", "lines": "i64", "docs": "i64"}[kind]
    return os.path.join(directory, f"{kind}_{shard:05d}.{extension}")


def _encode_documents(tokenizer, documents: list) -> tuple:
    """(token ids, tokens per kept line, kept lines per kept document) of `documents`, the ids concatenated in
    order; lines with no tokens and then documents with no lines are dropped."""
    lines = [line for document in documents for line in document]
    ids = [encoding.ids for encoding in tokenizer.encode_batch(lines, add_special_tokens=False)]
    line_lengths = np.fromiter(map(len, ids), OFFSET_DTYPE, len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), TOKEN_DTYPE, int(line_lengths.sum()))
    document_of_line = np.repeat(np.arange(len(documents)), [len(document) for document in documents])
    kept = line_lengths > 0
    lines_per_document = np.bincount(document_of_line[kept], minlength=len(documents)).astype(OFFSET_DTYPE)
    return tokens, line_lengths[kept], lines_per_document[lines_per_document > 0]


_worker_tokenizer = None


def _start_worker(tokenizer_json: str):
    """Pool initializer: each worker tokenises one batch at a time on one thread (the workers are the
    parallelism) with the parent's tokenizer."""
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    """A worker started with SIGINT blocked. A terminal's Ctrl-C reaches every process of its group; the parent
    alone handles it (stops the pool, exits with status 130), and a worker must stay silent, also in the second
    or so it spends importing torch before any code of ours runs (an initializer that ignored SIGINT left that
    window, and each worker printed a KeyboardInterrupt traceback there). A signal mask passes through fork and
    exec, so it is set on the parent's spawning thread for the moment of the spawn: a Ctrl-C then stays pending or
    goes to another thread of the parent, never lost (as CPython's own resource tracker starts)."""

    def start(self):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _WorkerContext(multiprocessing.context.SpawnContext):
    Process = _WorkerProcess


def _worker_pool(tokenizer, num_workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """spawn rather than fork: forking after tokenizers' thread pool has run can deadlock the child. A
    ProcessPoolExecutor, unlike multiprocessing.Pool, raises BrokenProcessPool when a worker dies (killed for
    memory, say) instead of waiting for its result forever."""
    return concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=_WorkerContext(),
                                                  initializer=_start_worker, initargs=(tokenizer.to_str(),))


def _encode_in_worker(documents: list) -> tuple:
    return _encode_documents(_worker_tokenizer, documents)


@contextlib.contextmanager
def _single_threaded_tokenizers():
    """Turns tokenizers' Rust thread pool off for the duration (TOKENIZERS_PARALLELISM is read at each
    encode_batch)."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _document_batches(sources: list, text_field: str, skipped: SkippedInput):
    """Lists of whole documents holding at least BATCH_LINES lines each (the last one may hold fewer)."""
    batch, lines = [], 0
    for source in sources:
        for document in iter_documents(source, text_field, skipped):
            batch.append(document)
            lines += len(document)
            if lines >= BATCH_LINES:
                yield batch
                batch, lines = [], 0
    if batch:
        yield batch


def _encoded_batches(batches, tokenizer, num_workers):
    """_encode_documents of each batch, in input order. None: in this process on tokenizers' Rust thread pool
    (all cores, unless TOKENIZERS_PARALLELISM turns it off, as tokenizers itself does in a process forked
    after using it); 1: in this process on one thread; n > 1: in n worker processes with at most
    BATCHES_IN_FLIGHT_PER_WORKER * n batches queued."""
    if num_workers is None or num_workers == 1:
        with contextlib.nullcontext() if num_workers is None else _single_threaded_tokenizers():
            for batch in batches:
                yield _encode_documents(tokenizer, batch)
        return
    executor = _worker_pool(tokenizer, num_workers)
    try:
        pending = collections.deque()
        for batch in batches:
            pending.append(executor.submit(_encode_in_worker, batch))
            if len(pending) >= BATCHES_IN_FLIGHT_PER_WORKER * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # On an error or a Ctrl-C, the queued batches are dropped, not tokenised first (the workers finish the one
        # they hold).
        executor.shutdown(wait=True, cancel_futures=True)


class _ShardWriter:
    """Appends encoded batches to shard files as they come, so that memory holds one batch whatever the
    corpus size; a shard is closed before the document that would take it past `shard_tokens` (a document
    longer than that gets a shard of its own)."""

    def __init__(self, directory: str, shard_tokens: int):
        self.directory = directory
        self.shard_tokens = shard_tokens
        self.shards = []  # per closed shard: {"tokens", "lines", "documents"}
        self.files = None  # the open shard's {"tokens", "lines", "docs"} files
        self.counts = None  # the open shard's {"tokens", "lines", "documents"}

    def _open_shard(self):
        self.files = {kind: open(_shard_file(self.directory, kind, len(self.shards)), "wb")
                      for kind in ("tokens", "lines", "docs")}
        self.counts = {"tokens": 0, "lines": 0, "documents": 0}

    def _close_shard(self):
        for file in self.files.values():
            file.flush()
            os.fsync(file.fileno())
            file.close()
        self.shards.append(self.counts)
        self.files = self.counts = None

    def append(self, tokens: np.ndarray, line_lengths: np.ndarray, lines_per_document: np.ndarray):
        line_ends = np.cumsum(line_lengths)
        document_line_starts = np.cumsum(lines_per_document) - lines_per_document
        document_line_ends = document_line_starts + lines_per_document
        document_token_ends = line_ends[document_line_ends - 1]
        written = 0  # documents of this batch written so far
        while written < len(lines_per_document):
            if self.files is None:
                self._open_shard()
            tokens_before = document_token_ends[written - 1] if written else 0
            room = self.shard_tokens - self.counts["tokens"]
            fitting = int(np.searchsorted(document_token_ends[written:] - tokens_before, room, side="right"))
            if fitting == 0 and self.counts["tokens"] > 0:
                self._close_shard()
                continue
            end = written + max(fitting, 1)
            first_line, end_line = document_line_starts[written], document_line_ends[end - 1]
            self.files["tokens"].write(tokens[tokens_before:document_token_ends[end - 1]].tobytes())
            shard_line_ends = line_ends[first_line:end_line] - tokens_before + self.counts["tokens"]
            self.files["lines"].write(shard_line_ends.astype(OFFSET_DTYPE).tobytes())
            shard_document_starts = document_line_starts[written:end] - first_line + self.counts["lines"]
            self.files["docs"].write(shard_document_starts.astype(OFFSET_DTYPE).tobytes())
            self.counts["tokens"] += int(document_token_ends[end - 1] - tokens_before)
            self.counts["lines"] += int(end_line - first_line)
            self.counts["documents"] += end - written
            written = end

    def close(self) -> list:
        """Closes the last shard; the counts of every shard."""
        if self.files is not None:
            self._close_shard()
        return self.shards

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        """Closes the files of a shard left open by an error (the build then deletes them)."""
        for file in (self.files or {}).values():
            file.close()


def _is_complete(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MARKER))


class TokenCache:
    """A built cache, read through memory maps: `document(i)` returns document i's lines as uint16 arrays."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not _is_complete(self.path):
            raise FileNotFoundError(f"path {self.path} is not a complete token cache: it has no {MARKER}")
        with open(os.path.join(self.path, MARKER), encoding="utf-8") as file:
            self.manifest = json.load(file)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"path {self.path} holds a token cache of format "
                             f"{self.manifest.get('format_version')!r}; this version reads format {FORMAT_VERSION}")
        self.key = self.manifest["key"]
        self.num_documents = self.manifest["num_documents"]
        self.num_tokens = self.manifest["num_tokens"]
        # Global index of each shard's first document, and one past the last.
        self._shard_document_starts = np.cumsum([0] + [shard["documents"] for shard in self.manifest["shards"]])
        self._maps = {}

    def _report_skipped(self) -> "TokenCache":
        """Warns, at every build or reuse, about what the corpus reading skipped (recorded in complete.json)."""
        if self.manifest["skipped"]:
            logger.warning("the corpus of token cache %s skipped %s", self.path,
                           SkippedInput.describe(self.manifest["skipped"]))
        return self

    def _shard_maps(self, shard: int) -> dict:
        if shard not in self._maps:
            dtypes = {"tokens": TOKEN_DTYPE, "lines": OFFSET_DTYPE, "docs": OFFSET_DTYPE}
            self._maps[shard] = {kind: np.memmap(_shard_file(self.path, kind, shard), dtype, mode="r")
                                 for kind, dtype in dtypes.items()}
        return self._maps[shard]

    def document(self, index: int) -> list:
        """The lines of document `index` (0 <= index < num_documents, counted across shards), each a uint16
        array of token ids viewing the memory-mapped shard."""
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document index {index} is outside [0, {self.num_documents})")
        shard = int(np.searchsorted(self._shard_document_starts, index, side="right")) - 1
        maps = self._shard_maps(shard)
        local = index - self._shard_document_starts[shard]
        first_line = maps["docs"][local]
        end_line = maps["docs"][local + 1] if local + 1 < len(maps["docs"]) else len(maps["lines"])
        ends = maps["lines"][first_line:end_line]
        starts = np.concatenate(([maps["lines"][first_line - 1] if first_line else 0], ends[:-1]))
        return [maps["tokens"][start:end] for start, end in zip(starts, ends)]

    @classmethod
    def build(cls, sources: list, tokenizer, cache_root: str | os.PathLike, *, text_field: str = "text",
              num_workers: int | None = None, shard_tokens: int = 2 ** 26) -> "TokenCache":
        """The cache of `sources` (paths that sources.iter_documents reads, in order) tokenised by `tokenizer`,
        reused from `cache_root` when there, built there otherwise. num_workers: None tokenises on all cores
        through tokenizers' Rust threads (which TOKENIZERS_PARALLELISM=false turns off), 1 on one thread,
        n > 1 in n worker processes (started with spawn, so a calling script needs an
        `if __name__ == "__main__":` guard). shard_tokens: tokens per shard, 2**26
        (128 MB) by default; it shapes files, not contents, so it is not part of the key."""
        if isinstance(sources, (str, bytes, os.PathLike)) or not sources:
            raise ValueError(f"sources must be a non-empty list of paths, got {sources!r}")
        if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
            raise ValueError(f"num_workers must be None or a positive integer, got {num_workers!r}")
        if not isinstance(shard_tokens, int) or shard_tokens < 1:
            raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab_size > MAX_VOCAB_SIZE:
            raise ValueError(f"tokenizer has a vocabulary of {vocab_size:,} tokens; the cache stores ids as "
                             f"uint16, so at most {MAX_VOCAB_SIZE:,}")
        if tokenizer.padding is not None or tokenizer.truncation is not None:
            raise ValueError("tokenizer pads or truncates its encodings, which would change the cached lines; "
                             "call tokenizer.no_padding() and tokenizer.no_truncation() first")
        descriptions = [describe_source(source) for source in sources]
        key_material = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
                        "text_field": text_field,
                        "sources": [[description["format"], description["sha256"]] for description in descriptions]}
        key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode("utf-8")).hexdigest()
        cache_root = os.fspath(cache_root)
        final = os.path.join(cache_root, key)
        if _is_complete(final):
            return cls(final)._report_skipped()
        os.makedirs(cache_root, exist_ok=True)
        building = tempfile.mkdtemp(prefix=f".{key}.", suffix=".building", dir=cache_root)
        try:
            skipped = SkippedInput()
            with _ShardWriter(building, shard_tokens) as writer:
                batches = _document_batches(sources, text_field, skipped)
                for encoded in _encoded_batches(batches, tokenizer, num_workers):
                    writer.append(*encoded)
                shards = writer.close()
            manifest = {**key_material, "key": key, "sources": descriptions, "vocab_size": vocab_size,
                        "num_documents": sum(shard["documents"] for shard in shards),
                        "num_lines": sum(shard["lines"] for shard in shards),
                        "num_tokens": sum(shard["tokens"] for shard in shards), "shards": shards,
                        "skipped": skipped.as_dict()}
            with atomic_output(os.path.join(building, MARKER)) as file:
                file.write(json.dumps(manifest, indent=1).encode("utf-8"))
            if os.path.isdir(final) and not _is_complete(final):  # named by the key yet never completed
                shutil.rmtree(final)
            try:
                os.rename(building, final)
            except OSError:
                if not _is_complete(final):  # else a concurrent build of the same key finished first
                    raise
        finally:
            if os.path.isdir(building):
                shutil.rmtree(building)
        return cls(final)._report_skipped()

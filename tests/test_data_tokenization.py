"""The data side's tokenisation: the BERT uncased tokenizer, vocabulary training, corpus readers and the token
cache (layout, reuse, keys, crash safety, bounded memory)."""
import gzip
import hashlib
import json
import lzma
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from electra_ext.data import token_cache
from electra_ext.data.sources import describe_source, iter_documents, iter_lines
from electra_ext.data.token_cache import TokenCache
from electra_ext.data.tokenizer import (DEFAULT_VOCAB, load_tokenizer, save_for_transformers, special_token_ids,
                                        tokenizer_fingerprint, train_tokenizer)

# Published SHA-256 of bert-base-uncased's vocab.txt.
BERT_UNCASED_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
# Documents with the corner cases of the formats: punctuation, accents, CJK, a line of control characters that
# BERT's text cleaning deletes (no tokens) and a document made only of such lines.
DOCUMENTS = [
    ["A single line document with numbers 3.14159 and 2,718."],
    ["The quick brown fox jumps over the lazy dog.", "It was not amused!"],
    ["ELECTRA trains a discriminator; the generator is small.", "Café au lait, naïve résumé.",
     "\x00\x01\x02", "東京は日本の首都です。"],
    ["\x00\x01"],
    ["Last document", "with two lines"],
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def vocab_lines(path):
    with open(path, encoding="utf-8") as file:
        return file.read().splitlines()


def plain_text(documents):
    """The BERT corpus format: one line per line, a blank line between documents."""
    return "\n\n".join("\n".join(document) for document in documents) + "\n"


def write_text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(os.path.splitext(path)[1], open)
    with opener(path, "wt", encoding="utf-8") as file:
        file.write(text)
    return str(path)


def documents_as_read(documents):
    """What the readers promise: lines stripped, blank lines and empty documents dropped."""
    stripped = [[line.strip() for line in document if line.strip()] for document in documents]
    return [document for document in stripped if document]


def tokenised_documents(tokenizer, documents):
    """The documents a cache must hold, tokenised one line at a time: lines without tokens and documents
    without lines dropped."""
    result = []
    for document in documents_as_read(documents):
        lines = [tokenizer.encode(line, add_special_tokens=False).ids for line in document]
        lines = [line for line in lines if line]
        if lines:
            result.append(lines)
    return result


def cached_documents(cache):
    return [[line.tolist() for line in cache.document(index)] for index in range(cache.num_documents)]


# --- tokenizer -------------------------------------------------------------------------------------------------

def test_default_vocab_is_bert_uncased(tokenizer):
    with open(DEFAULT_VOCAB, "rb") as file:
        assert hashlib.sha256(file.read()).hexdigest() == BERT_UNCASED_VOCAB_SHA256
    assert len(vocab_lines(DEFAULT_VOCAB)) == 30522
    assert tokenizer.get_vocab_size() == 30522
    assert special_token_ids(tokenizer) == {"pad": 0, "cls": 101, "sep": 102, "mask": 103}
    assert tokenizer.token_to_id("[UNK]") == 100


def test_special_tokens_are_added_only_on_request(tokenizer):
    text = "pre-training text"
    plain = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.encode(text).ids == [101] + plain + [102]
    assert 101 not in plain and 102 not in plain


@pytest.mark.parametrize("text", ["the quick brown fox jumps over the lazy dog.",
                                  "electra trains a discriminator, not a generator!",
                                  "unaffable tokenization of pre-training"])
def test_round_trip_of_lower_case_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text.replace("-", " - ")  # WordPiece splits and spaces out hyphens


def test_case_and_accents_are_folded(tokenizer):
    folded = tokenizer.encode("cafe naive uber resume", add_special_tokens=False).ids
    assert tokenizer.encode("Café NAÏVE Über résumé", add_special_tokens=False).ids == folded
    assert tokenizer.decode(tokenizer.encode("Café", add_special_tokens=False).ids) == "cafe"


def test_unknown_characters_become_unk(tokenizer):
    vocabulary = set(vocab_lines(DEFAULT_VOCAB))
    assert "☃" not in vocabulary and "##☃" not in vocabulary
    assert tokenizer.encode("☃", add_special_tokens=False).ids == [100]
    assert tokenizer.encode("snow ☃ man", add_special_tokens=False).ids == [
        tokenizer.token_to_id("snow"), 100, tokenizer.token_to_id("man")]


def test_ids_match_transformers(tokenizer):
    transformers = pytest.importorskip("transformers")
    # from_pretrained reads vocab.txt in transformers 4 and 5 alike (5 ignores a `vocab_file=` argument).
    reference = transformers.BertTokenizerFast.from_pretrained(os.path.dirname(DEFAULT_VOCAB), do_lower_case=True)
    assert len(reference) == 30522
    sentences = ["Hello, World!", "Café naïve Ünïcödé résumé", "東京は日本の首都です。",
                 "I can't believe it's 3.14159 — really?!", "x" * 150 + " a word over 100 characters",
                 "emoji 😀 and ☃ snow", "tab\tseparated\u00a0non-breaking space", "[MASK] stays special"]
    ours = [encoding.ids for encoding in tokenizer.encode_batch(sentences, add_special_tokens=False)]
    assert ours == [reference(sentence, add_special_tokens=False)["input_ids"] for sentence in sentences]


def test_fingerprint_follows_contents_not_files(tokenizer, tmp_path):
    assert tokenizer_fingerprint(load_tokenizer(DEFAULT_VOCAB)) == tokenizer_fingerprint(tokenizer)
    (tmp_path / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path)) == tokenizer_fingerprint(tokenizer)
    (tmp_path / "vocab.txt").write_text("\n".join(vocab_lines(DEFAULT_VOCAB)[:-1]) + "\n", encoding="utf-8")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "vocab.txt")) != tokenizer_fingerprint(tokenizer)


def test_load_tokenizer_rejects_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="without tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json is not a tokenizers JSON file"):
        load_tokenizer(tmp_path / "broken.json")
    (tmp_path / "no_cls.txt").write_text("[PAD]\n[UNK]\n[SEP]\nword\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no_cls.txt is not a BERT WordPiece vocabulary"):
        load_tokenizer(tmp_path / "no_cls.txt")


def test_special_token_ids_names_the_missing_token(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nword\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no \[MASK\] token"):
        special_token_ids(load_tokenizer(tmp_path))


def synthetic_words(count, seed):
    """Made-up words from ten syllables, so that subwords repeat across words."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "du"]
    return ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(count)]


@pytest.fixture(scope="module")
def training_corpus(tmp_path_factory):
    """A .gz corpus of 2,000 lines of 12 words, and how often each word occurs in it."""
    rng = random.Random(1)
    words = synthetic_words(3000, seed=0)
    lines = [rng.choices(words, k=12) for _ in range(2000)]
    path = write_text(str(tmp_path_factory.mktemp("training") / "corpus.txt.gz"),
                      "\n".join(" ".join(line) for line in lines) + "\n")
    counts = {}
    for word in (word for line in lines for word in line):
        counts[word] = counts.get(word, 0) + 1
    return path, counts


def test_train_tokenizer_gives_the_requested_vocab_size(training_corpus, tmp_path):
    path, counts = training_corpus
    for vocab_size in (100, 400):
        output = train_tokenizer([path], tmp_path / str(vocab_size), vocab_size=vocab_size)
        tokens = vocab_lines(os.path.join(output, "vocab.txt"))
        assert len(tokens) == vocab_size == load_tokenizer(output).get_vocab_size()
        assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        special_token_ids(load_tokenizer(output))


def test_train_tokenizer_stops_when_the_corpus_runs_out(training_corpus, tmp_path):
    """Asked for more entries than the corpus has subwords, WordPiece training merges until no pair occurs
    min_frequency times: every word seen twice becomes one token, and the vocabulary is smaller than asked."""
    path, counts = training_corpus
    output = train_tokenizer([path], tmp_path, vocab_size=100_000, min_frequency=2)
    trained = load_tokenizer(output)
    # Every token is a word's prefix or "##" and a later part of a word, or a special token.
    pieces = {word[:end] for word in counts for end in range(1, len(word) + 1)}
    pieces |= {"##" + word[start:end] for word in counts for start in range(1, len(word))
               for end in range(start + 1, len(word) + 1)}
    assert trained.get_vocab_size() <= 5 + len(pieces) < 100_000
    frequent = [word for word, count in counts.items() if count >= 2]
    assert all(len(trained.encode(word, add_special_tokens=False).ids) == 1 for word in frequent)
    # vocab.txt alone gives the same tokenizer as tokenizer.json for an uncased vocabulary.
    assert tokenizer_fingerprint(load_tokenizer(os.path.join(output, "vocab.txt"))) == tokenizer_fingerprint(trained)


def test_train_tokenizer_cased_keeps_case(training_corpus, tmp_path):
    path, counts = training_corpus
    word = max(counts, key=counts.get)
    cased = load_tokenizer(train_tokenizer([path], tmp_path, vocab_size=400, lowercase=False))
    assert cased.token_to_id("[UNK]") not in cased.encode(word, add_special_tokens=False).ids
    assert cased.encode(word.upper(), add_special_tokens=False).ids != cased.encode(word, add_special_tokens=False).ids


def accent_keeping_tokenizer():
    """BERT uncased's vocabulary behind another normalizer (lower-casing only, accents kept): a tokenizer.json a
    user may pass as --vocab that transformers' ElectraTokenizer cannot express."""
    from tokenizers import normalizers

    tokenizer = load_tokenizer()
    tokenizer.normalizer = normalizers.Lowercase()
    return tokenizer


@pytest.mark.parametrize("kind", ["bert_uncased", "cased", "other_normalizer"])
def test_saved_for_transformers_encodes_to_the_same_ids(kind, tmp_path):
    """What the run directory's discriminator/ and generator/ hold must tokenise as pre-training did, through
    each way transformers loads a tokenizer; a cased vocabulary was saved as lower-casing (other ids)."""
    transformers = pytest.importorskip("transformers")
    sentences = ["Hello World, Café naïve résumé!", "The QUICK brown fox 東京 jumps.", "Paris LONDON berlin"]
    if kind == "cased":
        corpus = write_text(str(tmp_path / "corpus.txt"), "\n".join(sentences * 50) + "\n")
        tokenizer = load_tokenizer(train_tokenizer([corpus], tmp_path / "trained", vocab_size=200, lowercase=False))
    else:
        tokenizer = load_tokenizer() if kind == "bert_uncased" else accent_keeping_tokenizer()
    save_for_transformers(tokenizer, tmp_path / "saved", model_max_length=512)
    ours = [encoding.ids for encoding in tokenizer.encode_batch(sentences)]
    loaders = [transformers.AutoTokenizer]
    if kind != "other_normalizer":  # the ElectraTokenizer classes rebuild BERT's normalizer from their flags
        loaders += [transformers.ElectraTokenizerFast, transformers.ElectraTokenizer]
    for loader in loaders:
        loaded = loader.from_pretrained(tmp_path / "saved")
        assert [loaded(sentence)["input_ids"] for sentence in sentences] == ours, loader.__name__
        assert loaded.model_max_length == 512
        assert (loaded.mask_token, loaded.pad_token_id) == ("[MASK]", tokenizer.token_to_id("[PAD]"))
    # The cased vocabulary really is cased, and the other normalizer really keeps accents.
    if kind == "cased":
        assert ours != [encoding.ids for encoding in tokenizer.encode_batch([s.lower() for s in sentences])]
    if kind == "other_normalizer":
        assert ours != [encoding.ids for encoding in load_tokenizer().encode_batch(sentences)]


@pytest.mark.parametrize("arguments,message", [
    (dict(files="corpus.txt"), "files must be a non-empty list of paths"),
    (dict(files=[]), "files must be a non-empty list of paths"),
    (dict(vocab_size=5), "vocab_size must be an integer above 5"),
    (dict(min_frequency=-1), "min_frequency must be a non-negative integer"),
])
def test_train_tokenizer_rejects_bad_arguments(training_corpus, tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        train_tokenizer(**{"files": [training_corpus[0]], "output_dir": tmp_path, **arguments})


# --- sources ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["corpus.txt", "corpus.txt.gz", "corpus.txt.xz"])
def test_plain_text_documents(tmp_path, name):
    text = "  padded line  \n\n\n" + plain_text(DOCUMENTS) + "\n\n"
    path = write_text(str(tmp_path / name), text)
    assert list(iter_documents(path)) == documents_as_read([["padded line"]] + DOCUMENTS)
    assert list(iter_lines(path)) == [line for document in documents_as_read([["padded line"]] + DOCUMENTS)
                                      for line in document]


def test_directory_documents_in_sorted_order_without_hidden_files(tmp_path):
    write_text(str(tmp_path / "b.txt"), plain_text(DOCUMENTS[2:]))
    write_text(str(tmp_path / "a" / "z.txt.gz"), plain_text(DOCUMENTS[:1]))
    write_text(str(tmp_path / "a.txt"), plain_text(DOCUMENTS[1:2]))
    write_text(str(tmp_path / ".hidden.txt"), "never read\n")
    write_text(str(tmp_path / ".git" / "objects.txt"), "never read\n")
    records = tmp_path / "c.jsonl"
    records.write_text(json.dumps({"text": "from\nJSONL"}) + "\n", encoding="utf-8")
    # Relative paths sort as a.txt < a/z.txt.gz < b.txt < c.jsonl.
    expected = documents_as_read(DOCUMENTS[1:2] + DOCUMENTS[:1] + DOCUMENTS[2:] + [["from", "JSONL"]])
    assert list(iter_documents(tmp_path)) == expected


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.jsonl.gz", "corpus.jsonl.xz"])
def test_jsonl_documents(tmp_path, name):
    records = [{"body": "\n".join(document), "id": index} for index, document in enumerate(DOCUMENTS)]
    text = "\n".join(json.dumps(record) for record in records) + "\n\n"
    path = write_text(str(tmp_path / name), text)
    assert list(iter_documents(path, text_field="body")) == documents_as_read(DOCUMENTS)


@pytest.mark.parametrize("lines,message", [
    (['{"text": "fine"}', '{"text": "fine"}', '{"text": broken}'], "line 3: not valid JSON"),
    (['{"text": "fine"}', '{"title": "no text"}'], "line 2: expected an object with text_field 'text', got 'title'"),
    (['["a", "list"]'], "line 1: expected an object with text_field 'text', got list"),
    (['{"text": 7}'], "line 1: text_field 'text' is int, expected a string"),
])
def test_invalid_jsonl_names_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        list(iter_documents(path))


def test_unreadable_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        iter_documents(tmp_path / "missing.txt")
    compressed = gzip.compress(("line\n" * 10_000).encode())
    (tmp_path / "truncated.txt.gz").write_bytes(compressed[:len(compressed) // 2])
    with pytest.raises(ValueError, match="truncated.txt.gz is not a valid text.gz file"):
        list(iter_documents(tmp_path / "truncated.txt.gz"))
    with pytest.raises(ValueError, match="text_field must be a non-empty string"):
        iter_documents(tmp_path / "truncated.txt.gz", text_field="")


def test_datasets_directories(tmp_path):
    datasets = pytest.importorskip("datasets", reason="reading save_to_disk directories needs `datasets`")
    rows = {"content": ["\n".join(document) for document in DOCUMENTS], "id": list(range(len(DOCUMENTS)))}
    dataset = datasets.Dataset.from_dict(rows)
    dataset.save_to_disk(str(tmp_path / "dataset"))
    assert list(iter_documents(tmp_path / "dataset", text_field="content")) == documents_as_read(DOCUMENTS)
    with pytest.raises(ValueError, match="no text_field 'text'; its columns are 'content', 'id'"):
        list(iter_documents(tmp_path / "dataset"))
    held_out = datasets.Dataset.from_dict({"content": ["held out"], "id": [0]})
    datasets.DatasetDict({"train": dataset, "test": held_out}).save_to_disk(str(tmp_path / "splits"))
    assert list(iter_documents(tmp_path / "splits", text_field="content")) == documents_as_read(DOCUMENTS)
    datasets.DatasetDict({"test": held_out}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(ValueError, match="DatasetDict without a 'train' split"):
        list(iter_documents(tmp_path / "no_train", text_field="content"))
    description = describe_source(tmp_path / "splits")
    assert description["format"] == "datasets" and description["files"] >= 1
    assert description["sha256"] == describe_source(tmp_path / "dataset")["sha256"]


def test_describe_source_fingerprints_contents(tmp_path):
    path = write_text(str(tmp_path / "corpus.txt"), plain_text(DOCUMENTS))
    with open(path, "rb") as file:
        contents = file.read()
    description = describe_source(path)
    assert description["sha256"] == hashlib.sha256(contents).hexdigest()
    assert (description["size"], description["files"], description["format"]) == (len(contents), 1, "text")
    assert describe_source(tmp_path)["format"] == "directory"
    before = describe_source(tmp_path)["sha256"]
    (tmp_path / "corpus.txt").rename(tmp_path / "renamed.txt")  # reading order follows names
    assert describe_source(tmp_path)["sha256"] != before


# --- token cache -----------------------------------------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path):
    """Two sources: a .gz text file and a JSONL file whose records hold DOCUMENTS[:2] as "text" and the same
    lines reversed as "body"."""
    text = write_text(str(tmp_path / "corpus.txt.gz"), plain_text(DOCUMENTS))
    records = tmp_path / "more.jsonl"
    records.write_text("".join(json.dumps({"text": "\n".join(document), "body": "\n".join(document[::-1])}) + "\n"
                               for document in DOCUMENTS[:2]), encoding="utf-8")
    return [text, str(records)]


def test_cache_holds_the_tokenised_documents_in_order(corpus, tokenizer, tmp_path):
    cache = TokenCache.build(corpus, tokenizer, tmp_path / "cache", num_workers=1)
    expected = tokenised_documents(tokenizer, DOCUMENTS + DOCUMENTS[:2])
    assert cached_documents(cache) == expected
    assert cache.num_documents == len(expected)
    assert cache.num_tokens == sum(len(line) for document in expected for line in document)
    assert all(line.dtype == np.uint16 for line in cache.document(0))
    assert cache.path == os.path.join(tmp_path / "cache", cache.key) and len(cache.key) == 64
    assert TokenCache(cache.path).key == cache.key and cached_documents(TokenCache(cache.path)) == expected
    with pytest.raises(IndexError, match=f"document index {len(expected)} is outside"):
        cache.document(len(expected))


def test_small_shards_keep_documents_whole(corpus, tokenizer, tmp_path):
    shard_tokens = 16
    cache = TokenCache.build(corpus, tokenizer, tmp_path / "cache", shard_tokens=shard_tokens)
    expected = tokenised_documents(tokenizer, DOCUMENTS + DOCUMENTS[:2])
    assert cached_documents(cache) == expected
    shards = cache.manifest["shards"]
    assert len(shards) > 1 and sum(shard["documents"] for shard in shards) == len(expected)
    document_tokens = iter(sum(map(len, document)) for document in expected)
    for index, shard in enumerate(shards):
        sizes = [next(document_tokens) for _ in range(shard["documents"])]
        assert shard["tokens"] == sum(sizes)
        assert shard["tokens"] <= shard_tokens or len(sizes) == 1  # only a long document overfills a shard
        assert os.path.getsize(os.path.join(cache.path, f"tokens_{index:05d}.u16")) == 2 * shard["tokens"]
        lines = np.fromfile(os.path.join(cache.path, f"lines_{index:05d}.i64"), dtype="<i8")
        assert len(lines) == shard["lines"] and lines[-1] == shard["tokens"]
        docs = np.fromfile(os.path.join(cache.path, f"docs_{index:05d}.i64"), dtype="<i8")
        assert len(docs) == shard["documents"] and docs[0] == 0


def test_worker_processes_give_the_same_cache(corpus, tokenizer, tmp_path):
    serial = TokenCache.build(corpus, tokenizer, tmp_path / "serial", num_workers=1, shard_tokens=64)
    parallel = TokenCache.build(corpus, tokenizer, tmp_path / "parallel", num_workers=2, shard_tokens=64)
    assert parallel.key == serial.key
    assert cached_documents(parallel) == cached_documents(serial)
    assert parallel.manifest["shards"] == serial.manifest["shards"]


def test_tokenisation_workers_leave_ctrl_c_to_the_parent(tokenizer):
    """A terminal's Ctrl-C reaches every process of its group: the workers have SIGINT blocked from their start
    (ignoring it from the pool's initializer on left them the seconds of importing torch, where each printed a
    KeyboardInterrupt traceback), and the parent's own mask is as it was."""
    parent_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with token_cache._worker_pool(tokenizer, 1) as pool:
        assert signal.SIGINT in pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, []).result()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == parent_mask


def test_rebuild_reuses_the_cache(corpus, tokenizer, tmp_path, monkeypatch):
    first = TokenCache.build(corpus, tokenizer, tmp_path / "cache")
    marker_mtime = os.stat(os.path.join(first.path, "complete.json")).st_mtime_ns

    def never(*arguments):
        raise AssertionError("a complete cache was tokenised again")

    monkeypatch.setattr(token_cache, "_encode_documents", never)
    second = TokenCache.build(corpus, load_tokenizer(), tmp_path / "cache")
    assert (second.path, second.key) == (first.path, first.key)
    assert os.stat(os.path.join(second.path, "complete.json")).st_mtime_ns == marker_mtime
    assert cached_documents(second) == cached_documents(first)


def test_changes_that_matter_give_a_new_key(corpus, tokenizer, tmp_path):
    cache_root = tmp_path / "cache"
    original = TokenCache.build(corpus, tokenizer, cache_root).key
    assert TokenCache.build(corpus[::-1], tokenizer, cache_root).key != original
    body = TokenCache.build(corpus, tokenizer, cache_root, text_field="body")
    assert body.key != original
    assert cached_documents(body) == tokenised_documents(tokenizer, DOCUMENTS + [d[::-1] for d in DOCUMENTS[:2]])
    write_text(corpus[0], plain_text(DOCUMENTS[:-1]))
    edited = TokenCache.build(corpus, tokenizer, cache_root)
    assert edited.key != original
    assert cached_documents(edited) == tokenised_documents(tokenizer, DOCUMENTS[:-1] + DOCUMENTS[:2])
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(vocab_lines(DEFAULT_VOCAB)[:30000]) + "\n", encoding="utf-8")
    assert TokenCache.build(corpus, load_tokenizer(vocab), cache_root).key != edited.key
    assert len([name for name in os.listdir(cache_root) if not name.startswith(".")]) == 5


def test_a_failed_build_leaves_no_cache(corpus, tokenizer, tmp_path, monkeypatch):
    real_iter_documents = token_cache.iter_documents

    def failing_after_some_documents(source, text_field, skipped):
        for count, document in enumerate(real_iter_documents(source, text_field, skipped)):
            if count == 3:
                raise RuntimeError("disk on fire")
            yield document

    monkeypatch.setattr(token_cache, "iter_documents", failing_after_some_documents)
    monkeypatch.setattr(token_cache, "BATCH_LINES", 1)  # so that shards are written before the failure
    cache_root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk on fire"):
        TokenCache.build(corpus, tokenizer, cache_root, shard_tokens=8)
    assert os.listdir(cache_root) == []
    monkeypatch.setattr(token_cache, "iter_documents", real_iter_documents)
    cache = TokenCache.build(corpus, tokenizer, cache_root, shard_tokens=8)
    assert cached_documents(cache) == tokenised_documents(tokenizer, DOCUMENTS + DOCUMENTS[:2])


def test_an_incomplete_directory_is_not_a_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete token cache"):
        TokenCache(tmp_path)


def test_build_rejects_bad_arguments(corpus, tokenizer, tmp_path):
    cases = [(dict(sources=corpus[0]), "sources must be a non-empty list of paths"),
             (dict(num_workers=0), "num_workers must be None or a positive integer"),
             (dict(shard_tokens=0), "shard_tokens must be a positive integer")]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            TokenCache.build(**{"sources": corpus, "tokenizer": tokenizer, "cache_root": tmp_path, **arguments})
    large = tmp_path / "large_vocab.txt"
    large.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n" + "".join(f"w{i}\n" for i in range(70_000)),
                     encoding="utf-8")
    with pytest.raises(ValueError, match="vocabulary of 70,005 tokens; the cache stores ids as uint16"):
        TokenCache.build(corpus, load_tokenizer(large), tmp_path)
    padding = load_tokenizer()
    padding.enable_padding(length=8)
    with pytest.raises(ValueError, match="pads or truncates"):
        TokenCache.build(corpus, padding, tmp_path)


# A subprocess, so that the measurement sees only the build: it resets the peak RSS after its imports
# (writing 5 to /proc/self/clear_refs) and reports how far the peak rose above the RSS at that point.
MEMORY_PROBE = textwrap.dedent("""
    import json, re, sys, time
    from electra_ext.data.token_cache import TokenCache
    from electra_ext.data.tokenizer import load_tokenizer

    def status_bytes(field):
        with open("/proc/self/status") as status:
            return int(re.search(field + r":\\s+(\\d+) kB", status.read()).group(1)) * 1024

    tokenizer = load_tokenizer()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    baseline = status_bytes("VmRSS")
    start = time.perf_counter()
    cache = TokenCache.build([sys.argv[1]], tokenizer, sys.argv[2])
    print(json.dumps({"growth": status_bytes("VmHWM") - baseline, "seconds": time.perf_counter() - start,
                      "documents": cache.num_documents, "tokens": cache.num_tokens}))
""")
# 60 MB of text in words of up to 6 letters (about 11M tokens: 22 MB of uint16 in one shard) against a 15 MB
# budget: holding the corpus, the shard or a Python list of its tokens breaks it. The build peaks about 5 MB
# above its baseline (a 1,000-line batch, the tokenizer's caches, per-thread allocator arenas: about 11 MB with
# 16 threads, hence the probe's 2). At 1.5-2 MB/s on 2 cores this takes 30-45 s.
MEMORY_CORPUS_BYTES = 60_000_000
MEMORY_BUDGET_BYTES = 15_000_000
MEMORY_PROBE_THREADS = "2"


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_building_a_large_cache_keeps_memory_bounded(tmp_path):
    words = [word for word in vocab_lines(DEFAULT_VOCAB) if word.isalpha() and len(word) <= 6]
    rng = random.Random(0)
    sentences = [" ".join(rng.choices(words, k=rng.randint(8, 30))).capitalize() + "." for _ in range(20_000)]
    corpus, written, documents = tmp_path / "corpus.txt", 0, 0
    with open(corpus, "w", encoding="utf-8") as file:
        while written < MEMORY_CORPUS_BYTES:
            written += file.write("\n".join(rng.choices(sentences, k=rng.randint(5, 40))) + "\n\n")
            documents += 1
    assert MEMORY_CORPUS_BYTES >= 4 * MEMORY_BUDGET_BYTES
    environment = {**os.environ, "RAYON_NUM_THREADS": MEMORY_PROBE_THREADS}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(corpus), str(tmp_path / "cache")],
                            capture_output=True, text=True, env=environment, timeout=600,
                            cwd=tmp_path)  # outside the source tree: the installed electra_ext
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"memory probe: {report} in {time.perf_counter() - start:.1f} s")
    assert report["documents"] == documents
    assert 2 * report["tokens"] > MEMORY_BUDGET_BYTES  # the shard's uint16 tokens alone would not fit
    assert report["growth"] < MEMORY_BUDGET_BYTES, (
        f"building a cache of {written:,} bytes raised peak RSS by {report['growth']:,} bytes")

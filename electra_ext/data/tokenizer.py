"""The WordPiece tokenizer of ELECTRA pre-training: loading (BERT uncased by default), training a vocabulary
on a corpus, its special-token ids, a fingerprint for cache keys, and saving it for transformers.

Tokenizers here are plain `tokenizers.Tokenizer` objects, so `encode_batch` runs in Rust on all cores. They
keep BERT's post-processor, which wraps each encoding in [CLS] ... [SEP] (the same ids as HF's
BertTokenizerFast); pre-training text must be encoded without it, because the example builder packs several
lines into one sequence and adds [CLS]/[SEP] itself:
`tokenizer.encode_batch(lines, add_special_tokens=False)`.
"""
import hashlib
import json
import os

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer
from tokenizers.models import WordPiece

from electra_ext._io import atomic_output
from electra_ext.data.sources import iter_lines

# BERT uncased's vocabulary (30,522 entries: [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103), the one
# ELECTRA was pre-trained with.
DEFAULT_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "vocab.txt")
# Names of the special tokens the example builder and the masking need, by role.
SPECIAL_TOKENS = {"cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "pad": "[PAD]"}
# Special tokens of a trained vocabulary, in id order: [PAD] gets id 0, which padding relies on.
TRAINED_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _bert_wordpiece(vocab: dict, lowercase: bool) -> Tokenizer:
    """BERT's WordPiece pipeline (text cleaning, CJK splitting, accent stripping with lower-casing as in BERT
    uncased, WordPiece with [UNK] for words it cannot spell, [CLS]/[SEP] post-processing) over `vocab`."""
    bert = BertWordPieceTokenizer(vocab, lowercase=lowercase, strip_accents=lowercase, clean_text=True)
    return Tokenizer.from_str(bert.to_str())


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer at `path`: None means BERT uncased (DEFAULT_VOCAB); a `tokenizer.json` file is loaded as
    it is; any other file is a WordPiece vocabulary (one token per line, like vocab.txt) and gets BERT uncased's
    pipeline (lower-casing, accent stripping); a directory must hold tokenizer.json or vocab.txt (tokenizer.json
    wins: it records options such as cased training that vocab.txt cannot)."""
    path = DEFAULT_VOCAB if path is None else os.fspath(path)
    if os.path.isdir(path):
        candidates = [os.path.join(path, name) for name in ("tokenizer.json", "vocab.txt")]
        found = [candidate for candidate in candidates if os.path.isfile(candidate)]
        if not found:
            raise FileNotFoundError(f"path {path} is a directory without tokenizer.json or vocab.txt")
        path = found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path} does not exist; expected a vocab.txt, a tokenizer.json or a "
                                "directory holding one")
    if path.endswith(".json"):
        try:
            return Tokenizer.from_file(path)
        except Exception as error:  # tokenizers raises plain Exception for malformed files
            raise ValueError(f"path {path} is not a tokenizers JSON file: {error}") from None
    try:
        return _bert_wordpiece(WordPiece.read_file(path), lowercase=True)
    except TypeError as error:  # BertWordPieceTokenizer's way of saying [CLS] or [SEP] is missing
        raise ValueError(f"path {path} is not a BERT WordPiece vocabulary: {error}") from None


def special_token_ids(tokenizer: Tokenizer) -> dict:
    """{"cls", "sep", "mask", "pad"} -> id in `tokenizer`'s vocabulary."""
    ids = {role: tokenizer.token_to_id(token) for role, token in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[role] for role, token_id in ids.items() if token_id is None]
    if missing:
        raise ValueError(f"tokenizer has no {', '.join(missing)} token; ELECTRA pre-training needs "
                         f"{', '.join(SPECIAL_TOKENS.values())}")
    return ids


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """SHA-256 of the tokenizer's canonical JSON: equal exactly when two tokenizers encode alike, whichever
    file they were loaded from (vocab.txt or the tokenizer.json written from it)."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def write_vocab_txt(vocab: dict, directory: str):
    """vocab.txt (one token per line, in id order), atomically: what BERT's tokenizers read."""
    with atomic_output(os.path.join(directory, "vocab.txt")) as file:
        file.write("".join(f"{token}\n" for token in sorted(vocab, key=vocab.__getitem__)).encode("utf-8"))


def train_tokenizer(files: list, output_dir: str | os.PathLike, vocab_size: int = 30522, min_frequency: int = 2,
                    lowercase: bool = True) -> str:
    """Trains a WordPiece vocabulary of at most `vocab_size` entries (fewer when the corpus has fewer
    subwords seen `min_frequency` times) on `files` (any source that `sources.iter_documents` reads),
    streaming their lines. Writes vocab.txt and tokenizer.json into `output_dir`, each atomically, and
    returns `output_dir`, which load_tokenizer loads. lowercase=False trains a cased vocabulary (no
    lower-casing, no accent stripping), which only tokenizer.json records."""
    if isinstance(files, (str, bytes, os.PathLike)) or not files:
        raise ValueError(f"files must be a non-empty list of paths, got {files!r}")
    if not isinstance(vocab_size, int) or vocab_size <= len(TRAINED_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an integer above {len(TRAINED_SPECIAL_TOKENS)} (the special "
                         f"tokens), got {vocab_size!r}")
    if not isinstance(min_frequency, int) or min_frequency < 0:
        raise ValueError(f"min_frequency must be a non-negative integer, got {min_frequency!r}")
    trainer = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase, clean_text=True)
    lines = (line for path in files for line in iter_lines(path))
    trainer.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=TRAINED_SPECIAL_TOKENS, show_progress=False)
    # The trainer's tokenizer lacks the [CLS]/[SEP] post-processor (BertWordPieceTokenizer adds it only when
    # built from a vocabulary), so the saved tokenizer.json is rebuilt from the trained vocabulary.
    vocab = trainer.get_vocab()
    if len(vocab) <= len(TRAINED_SPECIAL_TOKENS):
        raise ValueError(f"files {list(map(os.fspath, files))} hold no text to train a vocabulary on (it would have "
                         f"only the special tokens)")
    tokenizer = _bert_wordpiece(vocab, lowercase)
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    write_vocab_txt(vocab, output_dir)
    with atomic_output(os.path.join(output_dir, "tokenizer.json")) as file:
        file.write(tokenizer.to_str().encode("utf-8"))
    return output_dir


def save_for_transformers(tokenizer: Tokenizer, directory: str | os.PathLike, model_max_length: int):
    """Writes `tokenizer` into `directory` so that transformers' AutoTokenizer.from_pretrained(directory) encodes
    text to the same ids: tokenizer.json and a tokenizer_config.json, with vocab.txt for a BERT WordPiece one.

    transformers' ElectraTokenizer (and, in transformers 5, the Fast one) does not take tokenizer.json's
    normalizer as it is: it builds BERT's from the config's do_lower_case and strip_accents (defaults: lower-case
    and strip accents). So a BERT WordPiece tokenizer is saved as an ElectraTokenizer with its own flags (a
    cased vocabulary saved with BERT uncased's defaults encoded "Hello" as lower-case pieces), and any other
    (another normalizer or model, from a tokenizer.json given as --vocab) as a PreTrainedTokenizerFast, which
    runs tokenizer.json unchanged. model_max_length: the model's position embeddings (512 for every ELECTRA),
    as in Google's released tokenizers, not the pre-training sequence length."""
    directory = os.fspath(directory)
    spec = json.loads(tokenizer.to_str())
    normalizer = spec.get("normalizer") or {}
    config = {"model_max_length": model_max_length, "unk_token": spec["model"].get("unk_token", "[UNK]"),
              **{f"{role}_token": token for role, token in SPECIAL_TOKENS.items()}}
    if spec["model"]["type"] == "WordPiece" and normalizer.get("type") == "BertNormalizer":
        # BertNormalizer's strip_accents None means "as lowercase", which ElectraTokenizer reads the same way.
        config.update(tokenizer_class="ElectraTokenizer", do_lower_case=normalizer["lowercase"],
                      strip_accents=normalizer["strip_accents"],
                      tokenize_chinese_chars=normalizer["handle_chinese_chars"])
        write_vocab_txt(tokenizer.get_vocab(), directory)
    else:
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with atomic_output(os.path.join(directory, "tokenizer.json")) as file:
        file.write(tokenizer.to_str().encode("utf-8"))
    with atomic_output(os.path.join(directory, "tokenizer_config.json")) as file:
        file.write(json.dumps(config, indent=2).encode("utf-8"))

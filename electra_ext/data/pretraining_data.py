"""The pre-training data: corpus -> token cache -> train and held-out example sets -> batches by step.

Every document whose index is a multiple of `held_out_every` (every 50th by default) is held out for
evaluation, so the split is fixed for a corpus. Batches are a pure function of (seed, step): epoch e visits
the training examples in the permutation drawn from (seed, e), and step s takes the global batch at offset
s · global_batch of that endless sequence. A resumed run therefore continues exactly where it stopped, at
any world size, and each rank takes its own micro-batches of the same global batch.
"""
import os
from functools import lru_cache
from typing import List, Optional, Sequence

import numpy as np

from electra_ext.data.corpus import embedded_corpus_files
from electra_ext.data.examples import ExampleSet, SpecialTokens
from electra_ext.data.token_cache import TokenCache
from electra_ext.data.tokenizer import load_tokenizer, special_token_ids

HELD_OUT_EVERY = 50


def default_cache_dir() -> str:
    return os.environ.get("ELECTRA_EXT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "electra_ext"))


class PretrainingData:
    def __init__(self, sources: Sequence[str] = (), *, max_length: int, seed: int, vocab: Optional[str] = None,
                 text_field: str = "text", cache_dir: Optional[str] = None, num_workers: Optional[int] = None,
                 held_out_every: int = HELD_OUT_EVERY):
        """sources: text/JSONL files, directories or saved HF datasets; empty: the embedded corpus. vocab: a
        vocab.txt or tokenizer.json (default: BERT's uncased WordPiece vocabulary, ELECTRA's)."""
        if held_out_every < 2:
            raise ValueError(f"held_out_every must be at least 2, got {held_out_every}")
        self.tokenizer = load_tokenizer(vocab)
        ids = special_token_ids(self.tokenizer)
        self.special = SpecialTokens(cls=ids["cls"], sep=ids["sep"], pad=ids["pad"])
        self.mask_token_id = ids["mask"]
        self.vocab_size = self.tokenizer.get_vocab_size()
        files = list(sources) or embedded_corpus_files()
        self.cache = TokenCache.build(files, self.tokenizer, cache_dir or default_cache_dir(), text_field=text_field,
                                      num_workers=num_workers)
        documents = range(self.cache.num_documents)
        self.train = self._examples([i for i in documents if i % held_out_every], "train", max_length, seed)
        self.eval = self._examples([i for i in documents if i % held_out_every == 0], "eval", max_length, seed)
        if len(self.train) == 0:
            raise ValueError(f"the corpus {files} gave no training examples")

    def _examples(self, documents: List[int], split: str, max_length: int, seed: int) -> ExampleSet:
        path = os.path.join(self.cache.path, f"examples-L{max_length}-seed{seed}-{split}")
        return ExampleSet.build((self.cache.document(i) for i in documents), path, max_length=max_length,
                                special=self.special, seed=seed)


class BatchSchedule:
    """Which training examples step s uses; see the module docstring."""

    def __init__(self, num_examples: int, global_batch: int, seed: int):
        self.num_examples = num_examples
        self.global_batch = global_batch
        self.seed = seed

    @lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def epoch(self, step: int) -> float:
        return step * self.global_batch / self.num_examples

    def global_indices(self, step: int) -> np.ndarray:
        start = step * self.global_batch
        picked, position = [], start
        while position < start + self.global_batch:
            epoch, offset = divmod(position, self.num_examples)
            take = min(self.num_examples - offset, start + self.global_batch - position)
            picked.append(self._permutation(epoch)[offset:offset + take])
            position += take
        return np.concatenate(picked)

    def micro_indices(self, step: int, micro_batch: int, num_micro_batches: int) -> np.ndarray:
        """Micro-batch k of K equal parts of step's global batch (rank r, accumulation round m: k = r·A + m)."""
        size = self.global_batch // num_micro_batches
        return self.global_indices(step)[micro_batch * size:(micro_batch + 1) * size]

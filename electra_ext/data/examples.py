"""Pre-training examples built the way ELECTRA's reference code builds them (build_pretraining_dataset.py),
stored as fixed-length rows in a memory-mapped file.

Rules: tokenised lines of a document accumulate until they reach the target length (or the document ends);
the collected lines split into segment A (target (target_length - 3) // 2 tokens; 10% of examples keep
everything in A) and segment B, a line going to A when A is empty, when it fits under A's target, or with
probability 1/2 when it is the first line that does not fit and B is still empty; A is trimmed to L - 2 and
B to what is left, and the example is `[CLS] A [SEP] B [SEP]` (`[CLS] A [SEP]` without B), segment ids 0
then 1, padded to L. After each example the next target is L, or with probability 5% a random length in
[5, L]. No next-sentence task. All draws come from one seeded numpy Generator, so the examples are a pure
function of (token cache, documents, L, seed).
"""
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator, List

import numpy as np

FORMAT_VERSION = 1
SINGLE_SEGMENT_PROBABILITY = 0.1
RANDOM_LENGTH_PROBABILITY = 0.05
MIN_RANDOM_LENGTH = 5


@dataclass(frozen=True)
class SpecialTokens:
    cls: int
    sep: int
    pad: int


@dataclass(frozen=True)
class Example:
    input_ids: np.ndarray  # [length] token ids, [CLS] A [SEP] (B [SEP])
    segment_a_length: int  # tokens of [CLS] A [SEP]: segment id 0 before, 1 from there on


class ExampleBuilder:
    """Turns documents (lists of tokenised lines) into examples; see the module docstring."""

    def __init__(self, max_length: int, special: SpecialTokens, rng: np.random.Generator):
        if max_length < MIN_RANDOM_LENGTH:
            raise ValueError(f"max_length must be at least {MIN_RANDOM_LENGTH}, got {max_length}")
        self.max_length = max_length
        self.special = special
        self.rng = rng
        self.target_length = max_length
        self.lines: List[np.ndarray] = []
        self.length = 0

    def add_document(self, lines: Iterable[np.ndarray]) -> Iterator[Example]:
        for line in lines:
            if len(line) == 0:
                continue
            self.lines.append(line)
            self.length += len(line)
            if self.length >= self.target_length:
                yield self._emit()
        if self.length:  # a document's end flushes what it started
            yield self._emit()

    def _emit(self) -> Example:
        single_segment = self.rng.random() < SINGLE_SEGMENT_PROBABILITY
        a_target = np.inf if single_segment else (self.target_length - 3) // 2
        a: List[np.ndarray] = []
        b: List[np.ndarray] = []
        a_length = 0
        for line in self.lines:
            if (a_length == 0 or a_length + len(line) < a_target
                    or (not b and a_length < a_target and self.rng.random() < 0.5)):
                a.append(line)
                a_length += len(line)
            else:
                b.append(line)
        a_tokens = np.concatenate(a)[: self.max_length - 2]
        b_tokens = np.concatenate(b)[: max(0, self.max_length - len(a_tokens) - 3)] if b else a_tokens[:0]
        cls, sep = np.array([self.special.cls]), np.array([self.special.sep])
        parts = [cls, a_tokens, sep] + ([b_tokens, sep] if len(b_tokens) else [])
        self.lines, self.length = [], 0
        if self.rng.random() < RANDOM_LENGTH_PROBABILITY:
            self.target_length = int(self.rng.integers(MIN_RANDOM_LENGTH, self.max_length + 1))
        else:
            self.target_length = self.max_length
        return Example(np.concatenate(parts).astype(np.int64), len(a_tokens) + 2)


class ExampleSet:
    """Examples in fixed rows: `ids.u16` [N, L] (padded), `meta.i32` [N, 2] (length, segment A length)."""

    def __init__(self, path: str):
        with open(os.path.join(path, "examples.json")) as f:
            info = json.load(f)
        self.path = path
        self.max_length = info["max_length"]
        self.pad = info["pad"]
        self.num_examples = info["num_examples"]
        shape = (self.num_examples, self.max_length)
        self.ids = np.memmap(os.path.join(path, "ids.u16"), dtype=np.uint16, mode="r", shape=shape) \
            if self.num_examples else np.zeros(shape, np.uint16)
        self.meta = np.memmap(os.path.join(path, "meta.i32"), dtype=np.int32, mode="r",
                              shape=(self.num_examples, 2)) if self.num_examples else np.zeros((0, 2), np.int32)

    def __len__(self):
        return self.num_examples

    def batch(self, indices: np.ndarray) -> dict:
        """input_ids, attention_mask, token_type_ids: int64 numpy arrays [len(indices), L]."""
        indices = np.asarray(indices)
        ids = self.ids[indices].astype(np.int64)
        lengths, a_lengths = self.meta[indices, 0], self.meta[indices, 1]
        positions = np.arange(self.max_length)
        attention_mask = (positions < lengths[:, None]).astype(np.int64)
        token_type_ids = ((positions >= a_lengths[:, None]) & (positions < lengths[:, None])).astype(np.int64)
        return {"input_ids": ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}

    @classmethod
    def build(cls, documents: Iterable[List[np.ndarray]], path: str, *, max_length: int, special: SpecialTokens,
              seed: int) -> "ExampleSet":
        """Builds the examples of `documents` into directory `path` (reused when already complete). Memory
        stays at one document plus a write buffer; the directory appears complete or not at all."""
        if os.path.isfile(os.path.join(path, "examples.json")):
            return cls(path)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        temporary = tempfile.mkdtemp(dir=parent, prefix=".building-")
        try:
            builder = ExampleBuilder(max_length, special, np.random.default_rng(seed))
            count = 0
            with open(os.path.join(temporary, "ids.u16"), "wb") as ids_file, \
                    open(os.path.join(temporary, "meta.i32"), "wb") as meta_file:
                for document in documents:
                    for example in builder.add_document(document):
                        row = np.full(max_length, special.pad, dtype=np.uint16)
                        row[: len(example.input_ids)] = example.input_ids
                        ids_file.write(row.tobytes())
                        meta_file.write(np.array([len(example.input_ids), example.segment_a_length],
                                                 dtype=np.int32).tobytes())
                        count += 1
            with open(os.path.join(temporary, "examples.json"), "w") as f:
                json.dump({"format": FORMAT_VERSION, "max_length": max_length, "pad": special.pad, "seed": seed,
                           "num_examples": count}, f)
            os.rename(temporary, path)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        return cls(path)

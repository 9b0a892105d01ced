"""Example building (the reference code's packing rules) and the step -> batch schedule."""
import numpy as np
import pytest

from electra_ext.data.examples import ExampleBuilder, ExampleSet, SpecialTokens
from electra_ext.data.pretraining_data import BatchSchedule

SPECIAL = SpecialTokens(cls=101, sep=102, pad=0)


def synthetic_documents(count, seed=0):
    """Document d is made of lines whose tokens are 1000 * (d + 1) + running index: every token says which
    document it came from and where."""
    rng = np.random.default_rng(seed)
    documents = []
    for d in range(count):
        lengths = rng.integers(1, 40, size=rng.integers(1, 30))
        tokens = 1000 * (d + 1) + np.arange(lengths.sum())
        documents.append(np.split(tokens, np.cumsum(lengths)[:-1]))
    return documents


def build_all(documents, max_length, seed):
    builder = ExampleBuilder(max_length, SPECIAL, np.random.default_rng(seed))
    return [(d, example) for d, document in enumerate(documents) for example in builder.add_document(document)]


@pytest.mark.parametrize("max_length", [8, 64, 128])
def test_examples_follow_the_layout_and_never_mix_documents(max_length):
    documents = synthetic_documents(200)
    examples = build_all(documents, max_length, seed=1)
    for d, example in examples:
        ids, a_length = example.input_ids, example.segment_a_length
        assert 3 <= len(ids) <= max_length
        assert ids[0] == SPECIAL.cls and ids[a_length - 1] == SPECIAL.sep and ids[-1] == SPECIAL.sep
        a, b = ids[1:a_length - 1], ids[a_length:-1]
        assert len(a) > 0
        assert (SPECIAL.sep not in a) and (SPECIAL.sep not in b)
        body = np.concatenate([a, b])
        assert np.all(body // 1000 == d + 1)  # one document only
        # Each segment keeps document order (a short line may still join A after a longer one went to B,
        # as in the reference code).
        assert np.all(np.diff(a) > 0) and np.all(np.diff(b) > 0)


def test_without_truncation_every_token_is_used_once():
    # Lines short enough that nothing is trimmed: the examples' bodies hold each document's tokens once.
    documents = [[np.arange(5) + 1000 * (d + 1) + 5 * i for i in range(9)] for d in range(30)]
    examples = build_all(documents, 128, seed=2)
    for d, document in enumerate(documents):
        bodies = [np.concatenate([e.input_ids[1:e.segment_a_length - 1], e.input_ids[e.segment_a_length:-1]])
                  for doc, e in examples if doc == d]
        assert np.array_equal(np.sort(np.concatenate(bodies)), np.concatenate(document))


def test_single_segment_and_random_length_rates():
    # Documents long enough that every example is filled to its target.
    documents = [[np.arange(10) + 1000 * (d + 1) + 10 * i for i in range(400)] for d in range(20)]
    examples = [e for _, e in build_all(documents, 128, seed=3)]
    single = np.mean([len(e.input_ids) == e.segment_a_length for e in examples])
    assert abs(single - 0.1) < 4 * np.sqrt(0.1 * 0.9 / len(examples))
    short = np.mean([len(e.input_ids) < 100 for e in examples])  # a random target in [5, 128] is < 100 w.p. 0.74
    assert abs(short - 0.05 * 95 / 124) < 4 * np.sqrt(0.05 / len(examples)) + 0.005


@pytest.mark.parametrize("line_lengths, a_lengths", [
    # 6 + 4 reaches segment A's target of (23 - 3) // 2 = 10 tokens without staying under it: the line joins A
    # only by the reference's coin flip, with B still empty; the 20-token line then goes to B either way.
    ((6, 4, 20), {6: 0.45, 10: 0.45, 21: 0.1}),
    # 6 + 3 stays under the target, so A always takes it; the 20-token line is the first that does not fit and
    # gets the coin flip (21 = L - 2: everything, trimmed, in A, as in the single-segment 10%).
    ((6, 3, 20), {9: 0.45, 21: 0.55}),
    # A already at its target takes no coin flip: the rest goes to B.
    ((10, 4, 20), {10: 0.9, 21: 0.1}),
])
def test_segment_a_takes_lines_by_the_reference_rule(line_lengths, a_lengths):
    """The boundaries of the reference's rule, over 2,000 builders: A's token count is one of the listed ones
    at the listed rates. Chi-square at the 0.1% tail."""
    document = [np.arange(n) + 1000 * (i + 1) for i, n in enumerate(line_lengths)]
    counts = dict.fromkeys(a_lengths, 0)
    for seed in range(2000):
        (example,) = ExampleBuilder(23, SPECIAL, np.random.default_rng(seed)).add_document(document)
        a_length = example.segment_a_length - 2
        assert a_length in counts, a_length
        counts[a_length] += 1
    chi_square = sum((counts[n] - 2000 * p) ** 2 / (2000 * p) for n, p in a_lengths.items())
    assert chi_square < {1: 10.8, 2: 13.8}[len(a_lengths) - 1], counts


def test_builds_are_deterministic_given_the_seed():
    documents = synthetic_documents(50)
    first = [e.input_ids for _, e in build_all(documents, 64, seed=4)]
    again = [e.input_ids for _, e in build_all(documents, 64, seed=4)]
    other = [e.input_ids for _, e in build_all(documents, 64, seed=5)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)
    assert len(first) != len(other) or not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_example_set_rows_and_masks(tmp_path):
    documents = synthetic_documents(40)
    stored = ExampleSet.build(documents, str(tmp_path / "examples"), max_length=64, special=SPECIAL, seed=6)
    expected = [e for _, e in build_all(documents, 64, seed=6)]
    assert len(stored) == len(expected)
    batch = stored.batch(np.arange(len(stored)))
    for row, example in enumerate(expected):
        length = len(example.input_ids)
        assert np.array_equal(batch["input_ids"][row, :length], example.input_ids)
        assert not batch["input_ids"][row, length:].any()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (64 - length)
        assert batch["token_type_ids"][row].tolist() == (
            [0] * example.segment_a_length + [1] * (length - example.segment_a_length) + [0] * (64 - length))
    # Reopening reuses the stored set.
    assert len(ExampleSet.build([], str(tmp_path / "examples"), max_length=64, special=SPECIAL, seed=6)) == len(stored)


def test_schedule_visits_every_example_once_per_epoch_and_splits_batches_by_world():
    schedule = BatchSchedule(num_examples=103, global_batch=8, seed=7)
    visited = np.concatenate([schedule.global_indices(step) for step in range(103)])  # 8 epochs exactly
    epochs = [visited[epoch * 103:(epoch + 1) * 103] for epoch in range(8)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(103))
    # Each epoch in a new order (one order repeated would give every epoch's batches the same examples).
    assert len({tuple(order.tolist()) for order in epochs}) == 8
    for step in (0, 12, 13, 50):
        whole = schedule.global_indices(step)
        for parts in (1, 2, 4, 8):
            pieces = [schedule.micro_indices(step, k, parts) for k in range(parts)]
            assert np.array_equal(np.concatenate(pieces), whole)
    # A fresh schedule (a resumed run) gives the same batches.
    assert np.array_equal(BatchSchedule(103, 8, 7).global_indices(77), schedule.global_indices(77))
    assert not np.array_equal(BatchSchedule(103, 8, 8).global_indices(0), schedule.global_indices(0))


def test_held_out_documents_are_never_trained_on(tmp_path):
    """Document d of a corpus (one vocabulary word of its own, repeated) is held out for evaluation exactly when
    d % held_out_every == 0: its tokens appear in the eval examples and in no training example."""
    from electra_ext.data.pretraining_data import PretrainingData
    from electra_ext.data.tokenizer import load_tokenizer

    vocab = load_tokenizer().get_vocab()
    words = sorted(word for word in vocab if word.isalpha() and word.isascii() and len(word) > 3)[:40]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("\n".join(" ".join([word] * 7) for _ in range(3)) for word in words) + "\n")
    data = PretrainingData([str(corpus)], max_length=16, seed=0, cache_dir=str(tmp_path / "cache"), num_workers=1,
                           held_out_every=5)

    def words_of(examples):
        batch = examples.batch(np.arange(len(examples)))
        body = batch["input_ids"][batch["attention_mask"].astype(bool)]
        return set(body.tolist()) - {data.special.cls, data.special.sep}

    assert words_of(data.eval) == {vocab[word] for d, word in enumerate(words) if d % 5 == 0}
    assert words_of(data.train) == {vocab[word] for d, word in enumerate(words) if d % 5}

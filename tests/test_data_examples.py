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

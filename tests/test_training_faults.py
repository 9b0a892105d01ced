"""Training faults and checkpoint safety: fp16 overflow is skipped, a NaN loss stops the run without
checkpointing NaN weights, SIGKILL at random moments (mid-checkpoint included) never costs more than the steps
since the last checkpoint, corrupted checkpoints are detected and skipped, a full disk keeps the previous
checkpoint, and loading a checkpoint (training or HF directory) never runs code from it.

The runs are tiny (2-layer model, a 3,000-token vocabulary, batches of 4 x 32 tokens, one thread) so that
each step takes about 0.1 s and a checkpoint about 8 MB."""
import errno
import itertools
import json
import lzma
import multiprocessing
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

from electra_ext import ElectraDiscriminator, preset
from electra_ext.cli import main as cli_main
from electra_ext.data.corpus import embedded_corpus_files
from electra_ext.data.sources import file_sha256
from electra_ext.data.tokenizer import DEFAULT_VOCAB
from electra_ext.modules.pretraining import ElectraForPretraining
from electra_ext.train import TrainConfig, checkpoint, loop, pretrain
from electra_ext.train.checkpoint import checksum_problem, complete_checkpoints, load_checkpoint
from electra_ext.train.loop import TrainingDiverged
from electra_ext.train.metrics import read_metrics

# BERT's vocabulary up to "the" (line 1,997) holds the special tokens and every single character; 1,000 more
# lines add the commonest words. Embeddings of 3,000 x 64 keep a checkpoint (with Adam's moments) at 8 MB.
VOCAB_LINES = 3000
CORPUS_LINES = 3000  # of Jane Austen: about 1 MB, about 1,900 examples of 32 tokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small corpus, a small vocabulary and a token cache shared by the module's runs."""
    directory = tmp_path_factory.mktemp("faults")
    austen = next(path for path in embedded_corpus_files() if "austen" in path)
    with lzma.open(austen, "rt", encoding="utf-8") as file:
        (directory / "corpus.txt").write_text("".join(itertools.islice(file, CORPUS_LINES)), encoding="utf-8")
    with open(DEFAULT_VOCAB, encoding="utf-8") as file:
        (directory / "vocab.txt").write_text("".join(itertools.islice(file, VOCAB_LINES)), encoding="utf-8")
    return {"data": [str(directory / "corpus.txt")], "vocab": str(directory / "vocab.txt"),
            "cache_dir": str(directory / "cache")}


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as the killed child processes run (OMP_NUM_THREADS=1), so that results compare bit for bit;
    on a loaded 2-core machine it is also 20x faster than two threads waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_options(setup, output_dir, **changes) -> dict:
    values = dict(preset="tiny", max_seq_length=32, batch_size=4, steps=6, log_every=1, eval_every=1000,
                  eval_batches=1, checkpoint_every=2, keep_checkpoints=10, output_dir=str(output_dir), quiet=True,
                  seed=5, device="cpu", precision="fp32", num_workers=1, **setup)
    values.update(changes)
    return values


def run_config(setup, output_dir, **changes) -> TrainConfig:
    return TrainConfig.from_dict(run_options(setup, output_dir, **changes))


def train_losses(run_dir) -> list:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["split"] == "train"]


def assert_same_result(run_dir, reference_dir):
    """The same logged losses, each step once, and bit-identical final weights."""
    assert train_losses(run_dir) == train_losses(reference_dir)
    expected = load_file(os.path.join(reference_dir, "model", "model.safetensors"))
    actual = load_file(os.path.join(run_dir, "model", "model.safetensors"))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted 6-step run that interrupted ones must reproduce."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures come before the one_thread fixture
    run_dir = pretrain(run_config(setup, tmp_path_factory.mktemp("reference") / "run"))
    torch.set_num_threads(threads)
    return run_dir


def poison_training_step(monkeypatch, step: int, poison):
    """Training step `step` (from 1; one micro-batch per step) returns poison(its output) from the model."""
    original = ElectraForPretraining.forward
    calls = itertools.count(1)

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        return poison(out) if self.training and next(calls) == step else out

    monkeypatch.setattr(ElectraForPretraining, "forward", forward)


def checkpoint_at(run_dir, step: int) -> dict:
    return load_checkpoint(os.path.join(run_dir, "checkpoints", f"step-{step:07d}.pt"))


# --- Numerical faults.

@pytest.mark.parametrize("overflow_step", [1, 3])
def test_an_fp16_overflow_is_skipped_by_the_loss_scaler(setup, tmp_path, monkeypatch, overflow_step):
    """A forward pass that overflows (an infinite loss, as an fp16 overflow gives) at step 3: the scaler skips
    that update (the weights after step 3 equal those after step 2) and halves its scale; training goes on,
    with finite weights, to the end. At step 1, the first update: the same, with no warning from torch's
    scheduler (the rate follows the step count, skipped updates included)."""
    poison_training_step(monkeypatch, overflow_step, lambda out: out._replace(loss=out.loss * float("inf")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_dir = pretrain(run_config(setup, tmp_path / "run", precision="fp16", steps=5, checkpoint_every=1))
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    if overflow_step == 1:
        assert checkpoint_at(run_dir, 1)["scaler"]["scale"] == 2.0 ** 15  # torch's initial 2^16, halved
    else:
        states = {step: checkpoint_at(run_dir, step) for step in (2, 3, 4)}
        for name, value in states[3]["model"].items():
            assert torch.equal(value, states[2]["model"][name]), name
        assert any(not torch.equal(value, states[3]["model"][name]) for name, value in states[4]["model"].items())
        assert states[3]["scaler"]["scale"] == states[2]["scaler"]["scale"] / 2
    final = load_file(os.path.join(run_dir, "model", "model.safetensors"))
    assert all(torch.isfinite(value).all() for value in final.values())


@pytest.mark.parametrize("precision,loss_name", [("fp32", "mlm_loss"), ("bf16", "rtd_loss")])
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch,
                                                                            precision, loss_name):
    """A NaN loss at step 5, noticed at the step-6 checkpoint (the loop checks without a per-step host sync,
    before logging, evaluating or saving): the run stops naming step 5 and the loss, writes no checkpoint of the
    NaN weights, and the step-4 checkpoint is the newest, finite and loadable."""
    def poison(out):
        nan = getattr(out, loss_name) * float("nan")
        return out._replace(**{loss_name: nan, "loss": out.loss + nan})

    poison_training_step(monkeypatch, 5, poison)
    with pytest.raises(TrainingDiverged, match=f"step 5: {loss_name} is not finite .*training stopped "
                                               f"without writing a checkpoint.*newest checkpoint is .*step-0000004.pt"):
        pretrain(run_config(setup, tmp_path / "run", precision=precision, log_every=100))
    assert [os.path.basename(path) for path in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step-0000002.pt", "step-0000004.pt"]
    state = checkpoint_at(tmp_path / "run", 4)
    assert state["step"] == 4
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_the_cli_reports_a_diverged_run_without_a_traceback(setup, tmp_path, monkeypatch, capsys):
    poison_training_step(monkeypatch, 1, lambda out: out._replace(loss=out.loss * float("inf")))
    config = tmp_path / "run.json"
    config.write_text(json.dumps(run_options(setup, tmp_path / "run", steps=1)))
    assert cli_main(["pretrain", "--config", str(config)]) == 1
    assert "error: step 1: loss is not finite (loss inf" in capsys.readouterr().err


# --- Crash safety.

KILLS = 24
# Each child gets at most two checkpoints further than the one before it (see below): 24 kills reach step 48
# at most, so the run is never finished when a kill comes.
KILLED_RUN_STEPS = 50


# atomic_output's temporary file for step-NNNNNNN.pt (not for its .sha256).
CHECKPOINT_TEMPORARY = re.compile(r"\.step-\d+\.pt\.\w+\.tmp")


class CheckpointWrites:
    """Watches a checkpoint directory for the temporary files that begin checkpoint writes."""

    def __init__(self, checkpoint_dir: str):
        self.checkpoint_dir = checkpoint_dir
        self.interval = 0.3  # seconds between two writes (a step and a save); measured as writes are seen

    def names(self) -> list:
        return os.listdir(self.checkpoint_dir) if os.path.isdir(self.checkpoint_dir) else []

    def wait(self, count: int, timeout: float = 120):
        """Returns once `count` more writes have begun (or after `timeout` seconds)."""
        left_by_kills = set(self.names())
        seen, deadline = {}, time.monotonic() + timeout
        while len(seen) < count and time.monotonic() < deadline:
            for name in self.names():
                if CHECKPOINT_TEMPORARY.fullmatch(name) and name not in left_by_kills:
                    seen.setdefault(name, time.monotonic())
            time.sleep(0.002)
        times = sorted(seen.values())
        if len(times) > 1:
            self.interval = times[-1] - times[-2]


def test_sigkill_at_random_moments_loses_at_most_the_steps_since_the_last_checkpoint(setup, tmp_path,
                                                                                        monkeypatch):
    """`electra-ext pretrain` in a child process, checkpointing every step, SIGKILLed 24 times: after 0, 1 or
    2 checkpoint writes have begun (0: while it starts, loads data and the checkpoint), plus a random delay of
    up to a step (even kills) or of up to 10 ms (odd kills: into the save). After each kill the newest complete
    checkpoint verifies, loads, and is never older than before; once let finish, the run gives the
    uninterrupted run's losses and bit-identical weights."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read by the fork server's torch, as in the one_thread fixture
    context = multiprocessing.get_context("forkserver")
    # Children fork from a server that has imported electra_ext, what AdamW imports (torch._dynamo) and the
    # plots' matplotlib: several seconds fewer per start.
    context.set_forkserver_preload(["electra_ext.cli", "torch._dynamo", "matplotlib.pyplot"])

    def start(name: str, **changes):
        config = tmp_path / f"{name}.json"
        config.write_text(json.dumps(run_options(setup, tmp_path / name, steps=KILLED_RUN_STEPS, **changes)))
        child = context.Process(target=cli_main, args=(["pretrain", "--config", str(config)],))
        child.start()
        return child

    reference = start("reference", checkpoint_every=KILLED_RUN_STEPS)
    reference.join(timeout=300)
    assert reference.exitcode == 0

    checkpoint_dir = str(tmp_path / "killed" / "checkpoints")
    writes = CheckpointWrites(checkpoint_dir)
    schedule = random.Random(9)
    newest_step, kills_mid_checkpoint = 0, 0
    for kill in range(KILLS):
        child = start("killed", checkpoint_every=1, keep_checkpoints=2, resume=True)
        writes.wait(schedule.randint(0, 2))
        time.sleep(schedule.uniform(0, writes.interval if kill % 2 == 0 else 0.01))
        assert child.exitcode is None, f"the run finished before kill {kill + 1}: raise KILLED_RUN_STEPS"
        child.kill()
        child.join()
        names = writes.names()
        # A temporary file, or a .pt without its .sha256: the kill landed inside a checkpoint save.
        kills_mid_checkpoint += any(name.endswith(".tmp") or name.endswith(".pt") and name + ".sha256" not in names
                                    for name in names)
        complete = complete_checkpoints(checkpoint_dir)
        if complete:
            assert checksum_problem(complete[-1]) is None
            step = load_checkpoint(complete[-1])["step"]
            assert step >= newest_step
            newest_step = step
    assert kills_mid_checkpoint >= 4
    assert newest_step > 0

    final = start("killed", checkpoint_every=1, keep_checkpoints=2, resume=True)
    final.join(timeout=300)
    assert final.exitcode == 0
    assert_same_result(tmp_path / "killed", tmp_path / "reference")


# A training run that dies (os._exit: nothing closed, nothing flushed) as soon as step 5's record is logged.
DIE_AFTER_LOGGING_STEP_5 = """
import json, os, sys
from electra_ext.train import TrainConfig, metrics, pretrain
write = metrics.MetricsLog.write
def write_then_die(self, split, step, values):
    write(self, split, step, values)
    if split == "train" and step == 5:
        os._exit(3)
metrics.MetricsLog.write = write_then_die
pretrain(TrainConfig.from_dict(json.loads(sys.argv[1])))
"""


def test_tensorboard_shows_each_step_once_after_a_crash_and_a_resume(setup, reference, tmp_path, monkeypatch):
    """A run with --tensorboard dies after logging step 5 (its checkpoint is step 4's) and is resumed. TensorBoard's
    reader must show each logged step once, with metrics.jsonl's values. Before, the crashed run's step 5 and the
    resumed run's were both shown, the curve doubling back."""
    pytest.importorskip("tensorboard", reason="the TensorBoard test needs tensorboard (pip install '.[test]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    options = run_options(setup, tmp_path / "run", tensorboard=True)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the reference ran (the one_thread fixture)
    died = subprocess.run([sys.executable, "-c", DIE_AFTER_LOGGING_STEP_5, json.dumps(options)], timeout=300,
                          cwd=tmp_path)  # outside the source tree, whose electra_ext has no compiled _C
    assert died.returncode == 3
    events_dir = tmp_path / "run" / "tensorboard"
    (first_file,) = os.listdir(events_dir)
    # The reader takes event files in name order, and a name begins with the second its file was made in.
    while int(time.time()) <= int(first_file.split(".")[3]):
        time.sleep(0.05)
    pretrain(run_config(setup, tmp_path / "run", tensorboard=True, resume=True))
    assert train_losses(tmp_path / "run") == train_losses(reference)

    events = EventAccumulator(str(events_dir), size_guidance={"scalars": 0})
    events.Reload()
    records = read_metrics(tmp_path / "run")
    for split in ("train", "eval"):
        logged = [r for r in records if r["split"] == split]
        for name in set(logged[0]) - {"split", "step"}:
            shown = [(e.step, e.value) for e in events.Scalars(f"{split}/{name}")]
            expected = [(r["step"], r[name]) for r in logged]
            assert [step for step, _ in shown] == [step for step, _ in expected], f"{split}/{name}"
            assert [value for _, value in shown] == pytest.approx([value for _, value in expected], rel=1e-6)


# --- Ctrl-C: a real SIGINT to this process, handled wherever Python next checks for signals.

@pytest.fixture
def python_handles_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) during the test: a shell starts background jobs, CI's
    included, with SIGINT ignored, and Python then leaves it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupt_after(monkeypatch, owner, name, call: int):
    """Sends SIGINT to this process as call number `call` (from 1) of owner.name returns."""
    original = getattr(owner, name)
    calls = itertools.count(1)

    def interrupting(*args, **kwargs):
        result = original(*args, **kwargs)
        if next(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(owner, name, interrupting)


def test_ctrl_c_during_an_optimizer_update_checkpoints_that_step(setup, reference, tmp_path, monkeypatch, capsys,
                                                                python_handles_sigint):
    """SIGINT inside step 3's update (after the optimizer step, before the schedule's): the checkpoint is step
    3's, and resuming gives the uninterrupted result. Before, it was written as step 2 with step 3's weights and
    Adam moments, and the resumed run diverged."""
    interrupt_after(monkeypatch, torch.amp.GradScaler, "update", 3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(run_config(setup, tmp_path / "run"))
    assert checkpoint_at(tmp_path / "run", 3)["step"] == 3
    assert f"continue with --resume --output-dir {tmp_path / 'run'}" in capsys.readouterr().out
    monkeypatch.undo()
    pretrain(run_config(setup, tmp_path / "run", resume=True))
    assert_same_result(tmp_path / "run", reference)


def test_ctrl_c_as_a_checkpoint_is_written_does_not_write_it_again(setup, reference, tmp_path, monkeypatch,
                                                                   python_handles_sigint):
    """SIGINT as checkpoint 4's save returns: the run stops with step 4 saved once. Saving it again began by
    deleting its .sha256, so a second kill during the rewrite left no complete copy of step 4."""
    saved_steps = []
    original = loop.save_checkpoint

    def recording(checkpoint_dir, step, *args):
        saved_steps.append(step)
        return original(checkpoint_dir, step, *args)

    monkeypatch.setattr(loop, "save_checkpoint", recording)
    interrupt_after(monkeypatch, loop, "save_checkpoint", 2)  # step 4's (checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        pretrain(run_config(setup, tmp_path / "run"))
    assert saved_steps == [2, 4]
    monkeypatch.undo()
    pretrain(run_config(setup, tmp_path / "run", resume=True))
    assert_same_result(tmp_path / "run", reference)


# --- Corrupted checkpoints and full disks.

def test_a_corrupted_checkpoint_is_named_and_resume_falls_back_to_the_previous_one(setup, reference, tmp_path,
                                                                                   warnings_of):
    pretrain(run_config(setup, tmp_path / "run"), stop_after_step=4)
    newest = tmp_path / "run" / "checkpoints" / "step-0000004.pt"
    newest.write_bytes(newest.read_bytes()[:-1000])  # truncated
    with pytest.raises(ValueError, match=f"checkpoint {newest} cannot be used: its SHA-256 is .* \\(the file is "
                                         "truncated or corrupted\\)"):
        load_checkpoint(str(newest))
    run_dir = pretrain(run_config(setup, tmp_path / "run", resume=True))
    assert any(f"checkpoint {newest} is corrupted" in message and "resuming from the checkpoint before it" in message
               for message in warnings_of)
    assert os.path.isfile(f"{newest}.corrupt")  # kept for inspection, out of the way of later saves
    assert_same_result(run_dir, reference)


def test_a_checkpoint_without_its_checksum_is_set_aside_as_incomplete(setup, reference, tmp_path, warnings_of):
    """A save cut short between the checkpoint's rename and its .sha256's: the file is kept as *.incomplete,
    named in a warning, and the run resumes from the checkpoint before it to the uninterrupted result."""
    pretrain(run_config(setup, tmp_path / "run"), stop_after_step=4)
    newest = tmp_path / "run" / "checkpoints" / "step-0000004.pt"
    os.remove(f"{newest}.sha256")
    run_dir = pretrain(run_config(setup, tmp_path / "run", resume=True))
    assert any(f"checkpoint {newest} is incomplete" in message and "resuming from the checkpoint before it" in message
               for message in warnings_of)
    assert os.path.isfile(f"{newest}.incomplete")
    assert_same_result(run_dir, reference)


class DiskFillingFile:
    """A file on a disk with `room` bytes left: a write beyond it writes what fits, then fails as a full disk."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.file.write(bytes(data[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(setup, reference, tmp_path, monkeypatch):
    """The disk fills 1 MB into the second checkpoint: the run stops with an error naming the checkpoint and
    the full disk, the first checkpoint is intact, nothing half-written remains, and once there is room the
    run resumes to the uninterrupted result."""
    real_atomic_output = checkpoint.atomic_output
    saves = itertools.count(1)

    @contextmanager
    def filling_second_checkpoint(path, mode="wb"):
        with real_atomic_output(path, mode) as file:
            yield DiskFillingFile(file, 1 << 20) if path.endswith(".pt") and next(saves) == 2 else file

    monkeypatch.setattr(checkpoint, "atomic_output", filling_second_checkpoint)
    checkpoint_dir = tmp_path / "run" / "checkpoints"
    with pytest.raises(OSError, match="writing checkpoint .*step-0000004.pt failed \\(No space left on device\\); "
                                      "it was not written, and the newest complete checkpoint is still "
                                      ".*step-0000002.pt") as raised:
        pretrain(run_config(setup, tmp_path / "run"))
    assert raised.value.errno == errno.ENOSPC
    assert sorted(os.listdir(checkpoint_dir)) == ["step-0000002.pt", "step-0000002.pt.sha256"]
    assert checkpoint_at(tmp_path / "run", 2)["step"] == 2
    monkeypatch.setattr(checkpoint, "atomic_output", real_atomic_output)
    assert_same_result(pretrain(run_config(setup, tmp_path / "run", resume=True)), reference)


# --- Loading never runs code.

class CreatesMarker:
    """Unpickling this calls open(marker, "w"): what a malicious checkpoint would do instead of creating a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def write_with_checksum(path, state):
    """torch.save(state) at `path` with a matching .sha256, as an attacker who replaces both files would."""
    torch.save(state, path)
    with open(f"{path}.sha256", "w") as file:
        file.write(f"{file_sha256(str(path))}  {os.path.basename(path)}\n")


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: loading must need nothing but local files."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_a_checkpoint_that_would_run_code_is_refused(setup, tmp_path, no_network):
    marker = tmp_path / "code-ran"
    pretrain(run_config(setup, tmp_path / "run"), stop_after_step=2)
    good = checkpoint_at(tmp_path / "run", 2)
    malicious = tmp_path / "run" / "checkpoints" / "step-0000004.pt"
    write_with_checksum(malicious, {**good, "step": 4, "rng": CreatesMarker(str(marker))})
    refusal = f"checkpoint {malicious} cannot be loaded: it holds more than tensors and plain containers .*never runs"
    with pytest.raises(ValueError, match=refusal):
        load_checkpoint(str(malicious))
    with pytest.raises(ValueError, match=refusal):
        pretrain(run_config(setup, tmp_path / "run", resume=True))
    assert not marker.exists()


def test_an_hf_directory_that_would_run_code_is_refused(tmp_path, no_network):
    marker = tmp_path / "code-ran"
    model = ElectraDiscriminator(preset("tiny").discriminator)
    model.save_pretrained(str(tmp_path / "model"), safe_serialization=False)
    weights = tmp_path / "model" / "pytorch_model.bin"
    torch.save({**torch.load(weights, weights_only=True), "hook": CreatesMarker(str(marker))}, weights)
    with pytest.raises(ValueError, match="pytorch_model.bin holds more than tensors and plain containers"):
        ElectraDiscriminator.from_pretrained(str(tmp_path / "model"))
    assert not marker.exists()

"""Training checkpoints: what `pretrain` writes every checkpoint_every steps and resumes from.

A checkpoint is two files in the run's checkpoints/ directory:
- step-NNNNNNN.pt: torch.save of tensors and plain containers only (model, optimizer, schedule, loss scaler,
  RNG states, options), so it loads with torch.load(weights_only=True), which refuses to call anything a
  pickle names: loading a checkpoint never runs code from it.
- step-NNNNNNN.pt.sha256: its SHA-256 in `sha256sum` format (`sha256sum -c` checks it), written after the
  .pt: it marks the checkpoint complete.
Both are written atomically (temporary file, fsync, rename, directory fsync), .pt first, so a process killed
at any moment leaves every earlier checkpoint as it was; at worst a temporary file (deleted by the next save)
or a .pt without its .sha256 remains. Resuming takes the newest checkpoint whose .pt matches its .sha256; a
newer one that does not is renamed, never deleted, and named in a warning: to *.corrupt (truncated,
overwritten, bit rot) or *.incomplete (no .sha256: its save was interrupted, or an older electra_ext wrote
it), so that the run falls back to the one before and later saves cannot prune the good ones in its favour.
"""
import hashlib
import logging
import os
import pickle
import random
import re
from typing import Optional

import numpy as np
import torch

from electra_ext._io import atomic_output
from electra_ext.data.sources import file_sha256

logger = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256"
CORRUPT_SUFFIX = ".corrupt"
INCOMPLETE_SUFFIX = ".incomplete"
CHECKPOINT_NAME = re.compile(r"step-(\d{7,})\.pt")
# What atomic_output leaves behind when the process dies mid-write: ".step-0000012.pt.<random>.tmp".
TEMPORARY_NAME = re.compile(r"\.step-\d{7,}\.pt(\.sha256)?\..*\.tmp")


def checkpoint_path(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"step-{step:07d}.pt")


def checkpoint_files(checkpoint_dir: str) -> list:
    """Paths of every step-NNNNNNN.pt in `checkpoint_dir` (complete or not), oldest step first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    steps = sorted(int(match.group(1)) for match in map(CHECKPOINT_NAME.fullmatch, os.listdir(checkpoint_dir))
                   if match)
    return [checkpoint_path(checkpoint_dir, step) for step in steps]


def is_complete(path: str) -> bool:
    return os.path.isfile(path + CHECKSUM_SUFFIX)


def complete_checkpoints(checkpoint_dir: str) -> list:
    """Paths of the checkpoints whose save finished (their SHA-256 unchecked), oldest step first."""
    return [path for path in checkpoint_files(checkpoint_dir) if is_complete(path)]


def checksum_problem(path: str) -> Optional[str]:
    """None when the checkpoint at `path` matches its recorded SHA-256, else what is wrong with it."""
    if not is_complete(path):
        return f"it has no {os.path.basename(path)}{CHECKSUM_SUFFIX} (its save did not finish)"
    with open(path + CHECKSUM_SUFFIX, encoding="utf-8") as file:
        recorded = file.read().split(maxsplit=1)[:1]
    actual = file_sha256(path)
    if recorded != [actual]:
        return (f"its SHA-256 is {actual}, {os.path.basename(path)}{CHECKSUM_SUFFIX} records "
                f"{recorded[0] if recorded else 'nothing'} (the file is truncated or corrupted)")
    return None


class _HashingWriter:
    """A write-only file wrapper that hashes what goes through it, so the checksum costs no second read. It
    keeps the OSError of a failed write: torch.save turns it into a RuntimeError about zip positions."""

    def __init__(self, file):
        self.file = file
        self.digest = hashlib.sha256()
        self.error = None

    def write(self, data) -> int:
        self.digest.update(data)
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.file.flush()


def save_checkpoint(checkpoint_dir: str, step: int, state: dict, keep: int) -> str:
    """Writes `state` as checkpoint `step` (see the module docstring), then deletes all but the newest `keep`
    complete checkpoints and the temporary files of interrupted saves. Returns the .pt path. A failed write (a full disk:
    OSError ENOSPC) raises an OSError naming the checkpoint and leaves the earlier checkpoints untouched."""
    path = checkpoint_path(checkpoint_dir, step)
    if is_complete(path):  # an earlier save of this step: its .sha256 must not vouch for the new .pt
        os.remove(path + CHECKSUM_SUFFIX)
    try:
        with atomic_output(path) as file:
            writer = _HashingWriter(file)
            try:
                torch.save(state, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None
        with atomic_output(path + CHECKSUM_SUFFIX, "w") as file:
            file.write(f"{writer.digest.hexdigest()}  {os.path.basename(path)}\n")
    except OSError as error:
        complete = [p for p in complete_checkpoints(checkpoint_dir) if p != path]
        kept = f"the newest complete checkpoint is still {complete[-1]}" if complete else \
            "there is no earlier checkpoint"
        raise OSError(error.errno, f"writing checkpoint {path} failed ({error.strerror or error}); it was not "
                                   f"written, and {kept}") from error
    _prune(checkpoint_dir, keep)
    return path


def _prune(checkpoint_dir: str, keep: int):
    for path in complete_checkpoints(checkpoint_dir)[:-keep]:
        os.remove(path + CHECKSUM_SUFFIX)  # the mark first: a kill in between leaves an incomplete .pt
        os.remove(path)
    for name in os.listdir(checkpoint_dir):
        if TEMPORARY_NAME.fullmatch(name):
            os.remove(os.path.join(checkpoint_dir, name))


def resumable_checkpoint(checkpoint_dir: str) -> Optional[str]:
    """The newest complete checkpoint whose SHA-256 matches, or None. Newer ones that fail the check are
    renamed (kept for inspection) and named in a warning: to *.corrupt with a wrong SHA-256, *.incomplete
    without a .sha256."""
    for path in reversed(checkpoint_files(checkpoint_dir)):
        problem = checksum_problem(path)
        if problem is None:
            return path
        if is_complete(path):
            os.replace(path, path + CORRUPT_SUFFIX)
            os.replace(path + CHECKSUM_SUFFIX, path + CHECKSUM_SUFFIX + CORRUPT_SUFFIX)
            logger.warning("checkpoint %s is corrupted: %s; renamed it to %s and resuming from the checkpoint "
                           "before it", path, problem, os.path.basename(path) + CORRUPT_SUFFIX)
        else:
            os.replace(path, path + INCOMPLETE_SUFFIX)
            logger.warning("checkpoint %s is incomplete: %s; renamed it to %s and resuming from the checkpoint "
                           "before it", path, problem, os.path.basename(path) + INCOMPLETE_SUFFIX)
    return None


def load_checkpoint(path: str) -> dict:
    """The state saved by save_checkpoint at `path`, after checking its SHA-256, read with
    torch.load(weights_only=True): a ValueError names the file if it is corrupted or holds anything but tensors
    and plain containers (a pickle that would import or call something is refused, never run)."""
    problem = checksum_problem(path)
    if problem is not None:
        raise ValueError(f"checkpoint {path} cannot be used: {problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # what weights_only raises for anything but tensors and containers
        refused = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ValueError(f"checkpoint {path} cannot be loaded: it holds more than tensors and plain containers "
                         f"({refused}); electra_ext reads checkpoints with torch.load(weights_only=True) and never "
                         f"runs code from them") from None
    except RuntimeError as error:  # not a torch.save file (e.g. "failed finding central directory")
        raise ValueError(f"checkpoint {path} is not a torch.save file: {error}") from None


def rng_states() -> dict:
    """Every RNG's state as tensors and plain numbers (numpy's as an int64 tensor of its MT19937 keys), so
    that the checkpoint loads with weights_only=True."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict):
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])

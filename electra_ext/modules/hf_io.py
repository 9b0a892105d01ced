"""Reading and writing HF-format model directories (config.json + model.safetensors or pytorch_model.bin).

Local directories only: nothing is ever downloaded. What real checkpoints contain is tolerated: the legacy
`electra.embeddings.position_ids` / `token_type_ids` buffers, and a generator file without its tied
`generator_lm_head.weight` (safetensors cannot store a tensor twice, so HF omits it). Writing is atomic per
file, so a crash mid-save leaves the previous files intact.
"""
import os
import pickle

import torch
from torch import nn

from electra_ext._io import atomic_output
from electra_ext.modules.config import ElectraConfig
from electra_ext.modules.gdes import GradientDisentangledEmbedding

SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"
LEGACY_BUFFERS = ("electra.embeddings.position_ids", "electra.embeddings.token_type_ids")
TIED_KEYS = {"generator_lm_head.weight": "electra.embeddings.word_embeddings.weight"}


def exported_state_dict(model: nn.Module) -> dict:
    """The model's state dict as HF expects it: GDES embeddings (shared table + residual) materialised into
    plain `.weight` tables, tensors detached and on the CPU."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, GradientDisentangledEmbedding):
            del state[f"{name}.residual"]
            state[f"{name}.weight"] = module.weight
    return {key: value.detach().cpu() for key, value in state.items()}


def without_aliases(state: dict) -> dict:
    """Drops every entry that is the same tensor as an earlier one (a tied weight): safetensors refuses them."""
    seen, kept = set(), {}
    for key, value in state.items():
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if identity not in seen:
            seen.add(identity)
            kept[key] = value
    return kept


def save_weights(state: dict, directory: str, safe_serialization: bool = True) -> str:
    """Writes `state` as model.safetensors (or pytorch_model.bin) in `directory`; returns the file path."""
    state = without_aliases(state)
    if safe_serialization:
        from safetensors.torch import save as safetensors_bytes

        file = os.path.join(directory, SAFETENSORS_NAME)
        data = safetensors_bytes({key: value.contiguous() for key, value in state.items()},
                                 metadata={"format": "pt"})
        with atomic_output(file) as f:
            f.write(data)
    else:
        file = os.path.join(directory, PICKLE_NAME)
        with atomic_output(file) as f:
            torch.save(state, f)
    return file


def load_weights(directory: str) -> dict:
    """The state dict stored in an HF-format directory (safetensors preferred)."""
    safetensors_file = os.path.join(directory, SAFETENSORS_NAME)
    pickle_file = os.path.join(directory, PICKLE_NAME)
    if os.path.isfile(safetensors_file):
        from safetensors.torch import load_file

        return load_file(safetensors_file)
    if os.path.isfile(pickle_file):
        try:
            return torch.load(pickle_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:  # what weights_only raises for anything but tensors and containers
            refused = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise ValueError(f"{pickle_file} holds more than tensors and plain containers ({refused}); it is read "
                             f"with torch.load(weights_only=True), which never runs code from a file") from None
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {PICKLE_NAME} in {directory!r}")


def check_directory(path: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path!r} is not a local directory; from_pretrained reads local HF-format directories only (it "
            f"never downloads: fetch the checkpoint with `huggingface-cli download` first)")
    return path


def load_into(model: nn.Module, state: dict, source: str):
    """Loads an HF state dict into `model` (an ElectraDiscriminator or ElectraGenerator), tolerating legacy
    buffers and an omitted tied head; anything else missing or unexpected is an error naming the keys."""
    state = {key: value for key, value in state.items() if key not in LEGACY_BUFFERS}
    expected = model.state_dict()
    for tied, source_key in TIED_KEYS.items():
        if tied in expected and source_key in state:
            if tied in state and not torch.equal(state[tied], state[source_key]):
                raise ValueError(f"{source}: {tied} differs from {source_key}; electra_ext's generator ties them, "
                                 f"as ELECTRA does")
            state[tied] = state[source_key]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match {type(model).__name__} for its config: missing keys "
                         f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected keys "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, the config gives "
                             f"{tuple(expected[key].shape)}")
    model.load_state_dict(state)


class HFCheckpointMixin:
    """`save_pretrained` / `from_pretrained` in HF's directory format for a model with a `config` and an
    `HF_ARCHITECTURE` (the transformers class that loads the directory)."""

    HF_ARCHITECTURE = ""

    def save_pretrained(self, path: str, safe_serialization: bool = True) -> str:
        os.makedirs(path, exist_ok=True)
        save_weights(exported_state_dict(self), path, safe_serialization)
        self.config.save(path, architectures=[self.HF_ARCHITECTURE])
        return path

    @classmethod
    def from_pretrained(cls, path: str):
        check_directory(path)
        model = cls(ElectraConfig.load(path))
        load_into(model, load_weights(path), path)
        return model

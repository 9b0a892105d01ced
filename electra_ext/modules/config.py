"""ELECTRA model configuration with HF transformers' field names, and the reference code's presets.

`ElectraConfig` reads and writes an HF `config.json` (unknown HF keys are ignored on reading, so real
checkpoints' configs load). `PRESETS` holds the sizes and pre-training hyperparameters of the paper's
reference code (Clark et al. 2020, google-research/electra), plus a tiny one for tests.
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass

from electra_ext._io import atomic_output
from electra_ext.ops.attention import dropout_p_is_drawable

CONFIG_NAME = "config.json"


# HF ElectraConfig keys that change the encoder's math, each with the only value these modules implement: read as
# anything else, a checkpoint would load and silently compute another function.
HF_ONLY_VALUES = {"position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False}


@dataclass(frozen=True)
class ElectraConfig:
    """One ELECTRA transformer (discriminator or generator). Defaults are HF's (= ELECTRA-Small's)."""

    vocab_size: int = 30522
    embedding_size: int = 128
    hidden_size: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    hidden_act: str = "gelu"  # GELU in erf form, the only activation ELECTRA uses
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ElectraConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"ElectraConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act != "gelu":
            raise ValueError(f"ElectraConfig.hidden_act must be 'gelu' (erf form, ELECTRA's), got {self.hidden_act!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ElectraConfig.{name} must be in [0, 1), got {value!r}")
        if not dropout_p_is_drawable(self.attention_probs_dropout_prob):
            raise ValueError(f"ElectraConfig.attention_probs_dropout_prob must be 0 or in [1/512, 511/512): the "
                             f"attention kernels draw its mask with 1/256 resolution (ops.attention), got "
                             f"{self.attention_probs_dropout_prob!r}")
        for name in ("initializer_range", "layer_norm_eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"ElectraConfig.{name} must be a positive number, got {value!r}")
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int) or not (
            0 <= self.pad_token_id < self.vocab_size
        ):
            raise ValueError(
                f"ElectraConfig.pad_token_id must be an integer in [0, vocab_size={self.vocab_size}), "
                f"got {self.pad_token_id!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def generator(self, fraction: float) -> "ElectraConfig":
        """The generator for this discriminator: hidden size and FFN scaled by `fraction`, one head per 64
        hidden units (at least one), the same layers, embeddings and vocabulary (the reference code's rule)."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"generator fraction must be in (0, 1], got {fraction!r}")
        hidden = max(1, round(self.hidden_size * fraction))
        return dataclasses.replace(
            self,
            hidden_size=hidden,
            num_attention_heads=max(1, hidden // 64),
            intermediate_size=max(1, round(self.intermediate_size * fraction)),
        )

    def to_dict(self) -> dict:
        """The fields, with HF's `model_type`, as in an HF config.json."""
        return {"model_type": "electra", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "ElectraConfig":
        """Reads the fields this class has; other keys of an HF config (summary_type, architectures, ...) are
        ignored, except those that would change the encoder's math (HF_ONLY_VALUES): a value other than the one
        these modules implement is an error, as a `model_type` other than electra is."""
        for name, supported in {"model_type": "electra", **HF_ONLY_VALUES}.items():
            if values.get(name, supported) != supported:
                raise ValueError(f"config {name} must be {supported!r} (the only value electra_ext implements), got "
                                 f"{values[name]!r}")
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in names})

    def save(self, path: str, *, architectures=None) -> str:
        """Writes config.json into directory `path` (created if needed); returns the file's path.
        architectures: the HF model classes that load the directory, recorded for `AutoModel`."""
        values = self.to_dict() if architectures is None else {**self.to_dict(), "architectures": list(architectures)}
        file = os.path.join(path, CONFIG_NAME)
        with atomic_output(file, "w") as f:
            json.dump(values, f, indent=2, sort_keys=True)
            f.write("\n")
        return file

    @classmethod
    def load(cls, path: str) -> "ElectraConfig":
        """Reads a config.json, given the file or the directory that holds it."""
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"ElectraConfig.load: no config file at {file!r}")
        with open(file) as f:
            try:
                values = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"ElectraConfig.load: {file!r} is not valid JSON: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"ElectraConfig.load: {file!r} must hold a JSON object")
        return cls.from_dict(values)


@dataclass(frozen=True)
class ElectraPreset:
    """A model size with the reference code's pre-training hyperparameters for it."""

    name: str
    discriminator: ElectraConfig
    generator_fraction: float
    mask_prob: float
    learning_rate: float
    batch_size: int
    max_seq_length: int
    steps: int  # the paper's (Table 6: 1M, 766k, 400k); tiny: the CPU run's

    @property
    def generator(self) -> ElectraConfig:
        return self.discriminator.generator(self.generator_fraction)


PRESETS = {
    preset.name: preset
    for preset in (
        # For tests and the CPU: two thin layers on the real BERT vocabulary.
        ElectraPreset("tiny", ElectraConfig(embedding_size=64, hidden_size=128, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=512),
                      generator_fraction=0.25, mask_prob=0.15, learning_rate=5e-4, batch_size=8, max_seq_length=128,
                      steps=800),
        ElectraPreset("small", ElectraConfig(embedding_size=128, hidden_size=256, num_hidden_layers=12,
                                             num_attention_heads=4, intermediate_size=1024),
                      generator_fraction=0.25, mask_prob=0.15, learning_rate=5e-4, batch_size=128,
                      max_seq_length=128, steps=1_000_000),
        ElectraPreset("base", ElectraConfig(embedding_size=768, hidden_size=768, num_hidden_layers=12,
                                            num_attention_heads=12, intermediate_size=3072),
                      generator_fraction=1 / 3, mask_prob=0.15, learning_rate=2e-4, batch_size=256,
                      max_seq_length=512, steps=766_000),
        ElectraPreset("large", ElectraConfig(embedding_size=1024, hidden_size=1024, num_hidden_layers=24,
                                             num_attention_heads=16, intermediate_size=4096),
                      generator_fraction=0.25, mask_prob=0.25, learning_rate=2e-4, batch_size=2048,
                      max_seq_length=512, steps=400_000),
    )
}


def preset(name: str) -> ElectraPreset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]

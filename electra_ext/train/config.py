"""TrainConfig: everything `electra-ext pretrain` can be told, with defaults from the model preset and the
machine. Fields left None are resolved by `resolve()`: the preset's batch size, sequence length and learning
rate, and "auto" precision/preset from the device. A YAML or JSON file and command-line flags set fields."""
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from electra_ext.data.examples import MIN_RANDOM_LENGTH
from electra_ext.modules.config import PRESETS, preset as model_preset
from electra_ext.modules.pretraining import MASKING_MODES, SHARING_MODES

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TRAIN_CONFIG_NAME = "train_config.json"  # a run directory's resolved options
# What a resumed run does not take from its train_config.json: what belongs to this machine and invocation
# (micro_batch_size was resolved for the world size of then).
PER_INVOCATION_OPTIONS = ("device", "num_workers", "quiet", "resume", "output_dir", "compile", "tensorboard",
                          "micro_batch_size", "gradient_checkpointing")

# The CPU run: the tiny model on short batches, sized so that the default command finishes in about 4 minutes
# on 2 cores (4 min 21 s on 2026-11-28's CI machine) with the discriminator clearly better than "always
# original".
CPU_DEFAULTS = dict(preset="tiny", batch_size=16, steps=800, eval_every=100, checkpoint_every=200)
# On a GPU: ELECTRA-Small as the paper trains it, and each preset for the paper's number of steps.
GPU_DEFAULTS = dict(preset="small", eval_every=5000, checkpoint_every=10_000)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURAL_TYPE_NAMES = {float: "numbers", str: "strings"}


def _is_instance(value, expected: type) -> bool:
    """isinstance, except that a bool is no integer or number here and an integer is a number."""
    if expected is not bool and isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if expected is float else isinstance(value, expected)


def resolve_device(device: str) -> str:
    """auto: the current CUDA device when there is one, else cpu; cuda: the current CUDA device, with its index
    (torch.cuda.set_device and DDP need one). A CUDA device this machine lacks is a ValueError."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device is {device!r}, but torch finds no CUDA device on this machine")
    index = torch.device(device).index
    if index is None:
        return f"cuda:{torch.cuda.current_device()}"
    if index >= torch.cuda.device_count():
        raise ValueError(f"device is {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def option(default, help: str):
    """A TrainConfig field with its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    # What to train on
    data: Tuple[str, ...] = option((), "text files (.txt/.gz/.xz, blank line between documents), JSONL files, "
                                       "directories or saved HF datasets; none: the embedded corpus")
    vocab: Optional[str] = option(None, "vocab.txt or tokenizer.json; default: BERT's uncased WordPiece (ELECTRA's)")
    text_field: str = option("text", "the text field of JSONL records and dataset rows")
    cache_dir: Optional[str] = option(None, "token cache directory; default: $ELECTRA_EXT_CACHE or "
                                            "~/.cache/electra_ext")
    # The model
    preset: str = option("auto", "model size: tiny, small, base, large; auto: tiny on CPU, small on GPU")
    sharing: str = option("tied", "generator/discriminator embedding sharing: tied, untied, gdes")
    masking: str = option("electra", "electra (85%% [MASK], 15%% kept) or bert (80/10/10)")
    mask_prob: Optional[float] = option(None, "share of tokens masked; default: the preset's (0.15; large 0.25)")
    gen_weight: float = option(1.0, "weight of the generator's MLM loss")
    disc_weight: float = option(50.0, "weight of the discriminator's replaced-token-detection loss")
    temperature: float = option(1.0, "sampling temperature of the generator")
    # The optimisation
    steps: Optional[int] = option(None, "optimizer steps; default: 800 on CPU; on GPU the preset's "
                                             "(the paper's: small 1M, base 766k, large 400k)")
    batch_size: Optional[int] = option(None, "global batch in sequences per optimizer step; default: the "
                                             "preset's (tiny 8, small 128, base 256, large 2048), and 16 for "
                                             "the CPU run without --preset")
    micro_batch_size: Optional[int] = option(None, "sequences per rank and forward pass (gradient accumulation "
                                                   "makes up the rest); default: batch_size / world size")
    max_seq_length: Optional[int] = option(None, "tokens per sequence; default: the preset's (128 or 512)")
    learning_rate: Optional[float] = option(None, "peak learning rate; default: the preset's")
    warmup_steps: Optional[int] = option(None, "linear warmup steps; default: min(10000, steps / 10)")
    weight_decay: float = option(0.01, "AdamW weight decay (never on LayerNorm weights and biases)")
    adam_betas: Tuple[float, float] = option((0.9, 0.999), "Adam beta1 beta2")
    adam_epsilon: float = option(1e-6, "Adam epsilon")
    adam_bias_correction: bool = option(True, "false: the reference code's Adam without bias correction (larger early "
                                                 "steps: 3.2x AdamW's at step 1, 1.26x at step 1,000)")
    max_grad_norm: float = option(1.0, "gradient clipping by global norm")
    precision: str = option("auto", "bf16 (autocast), fp16 (autocast and loss scaling; on the CPU too, "
                                    "slowly), fp32; auto: bf16 where the GPU supports it, else fp32")
    compile: bool = option(False, "torch.compile the joint model")
    gradient_checkpointing: bool = option(False, "recompute each encoder layer's activations in the backward "
                                                 "pass: a quarter to a tenth of the memory for one more forward "
                                                 "pass, the same results")
    seed: int = option(1, "seed of initialisation, example building, batch order, masking and sampling")
    # Bookkeeping
    output_dir: Optional[str] = option(None, "run directory; default: runs/electra-<preset>-<date-time>")
    resume: bool = option(False, "continue the run in output_dir from its newest checkpoint")
    eval_every: Optional[int] = option(None, "steps between held-out evaluations; default: 100 on CPU, "
                                             "5000 on GPU")
    eval_batches: int = option(20, "micro-batches of the held-out split per evaluation")
    checkpoint_every: Optional[int] = option(None, "steps between checkpoints; default: 200 on CPU, "
                                                   "10000 on GPU")
    keep_checkpoints: int = option(3, "newest checkpoints kept")
    log_every: int = option(10, "steps between training-metric records")
    tensorboard: bool = option(False, "also write TensorBoard events (needs the tensorboard package)")
    quiet: bool = option(False, "log lines instead of a progress bar")
    num_workers: Optional[int] = option(None, "tokenisation processes; default: this process, on all cores "
                                              "(tokenizers' threads)")
    device: str = option("auto", "cpu, cuda or cuda:N; auto: cuda when available")

    def __post_init__(self):
        self._check_types()
        if self.preset != "auto" and self.preset not in PRESETS:
            raise ValueError(f"preset must be auto or one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.sharing not in SHARING_MODES:
            raise ValueError(f"sharing must be one of {', '.join(SHARING_MODES)}, got {self.sharing!r}")
        if self.masking not in MASKING_MODES:
            raise ValueError(f"masking must be one of {', '.join(MASKING_MODES)}, got {self.masking!r}")
        for name in ("steps", "batch_size", "micro_batch_size", "max_seq_length", "eval_every",
                     "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("keep_checkpoints", "log_every", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm!r}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if not self.adam_epsilon > 0:
            raise ValueError(f"adam_epsilon must be positive, got {self.adam_epsilon!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay!r}")
        if self.mask_prob is not None and not 0 < self.mask_prob < 0.99:
            raise ValueError(f"mask_prob must be in (0, 0.99), got {self.mask_prob!r}")
        if self.max_seq_length is not None and self.max_seq_length < MIN_RANDOM_LENGTH:
            raise ValueError(f"max_seq_length must be at least {MIN_RANDOM_LENGTH} (the shortest example the "
                             f"builder makes), got {self.max_seq_length!r}")
        if self.resume and self.output_dir is None:
            raise ValueError("resume needs output_dir: the run directory to continue")
        if self.device != "auto":
            try:
                device = torch.device(self.device)
            except RuntimeError:
                device = None
            if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
                raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def _check_types(self):
        """Each field's value against its annotation: a config file's values arrive unchecked (YAML reads 1e-3 as
        a string)."""
        for name, hint in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            arguments = typing.get_args(hint)
            if type(None) in arguments:
                if value is None:
                    continue
                hint = next(a for a in arguments if a is not type(None))
            if typing.get_origin(hint) is tuple:
                item = typing.get_args(hint)[0]
                if isinstance(value, tuple) and all(_is_instance(v, item) for v in value):
                    continue
                expected = f"a list of {_PLURAL_TYPE_NAMES[item]}"
            elif _is_instance(value, hint):
                continue
            else:
                expected = _TYPE_NAMES[hint]
            raise ValueError(f"{name} must be {expected}, got {value!r}")

    def resolve(self, world_size: int = 1) -> "TrainConfig":
        """Fills every None/auto field from the preset and the machine; checks the batch arithmetic."""
        device = resolve_device(self.device)
        machine = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
        name = self.preset if self.preset != "auto" else machine["preset"]
        chosen = model_preset(name)
        auto = self.preset == "auto"
        steps = self.steps or machine.get("steps", chosen.steps)
        batch_size = self.batch_size or (machine.get("batch_size", chosen.batch_size) if auto else chosen.batch_size)
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
        micro_batch_size = self.micro_batch_size or batch_size // world_size
        if batch_size % (micro_batch_size * world_size):
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of micro_batch_size "
                             f"({micro_batch_size}) x world size ({world_size})")
        max_seq_length = self.max_seq_length or chosen.max_seq_length
        if max_seq_length > chosen.discriminator.max_position_embeddings:
            raise ValueError(f"max_seq_length ({max_seq_length}) exceeds the model's max_position_embeddings "
                             f"({chosen.discriminator.max_position_embeddings})")
        return dataclasses.replace(
            self, device=device, preset=name, steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size,
            max_seq_length=max_seq_length, precision=precision,
            learning_rate=self.learning_rate or chosen.learning_rate,
            mask_prob=self.mask_prob if self.mask_prob is not None else chosen.mask_prob,
            warmup_steps=self.warmup_steps if self.warmup_steps is not None else min(10_000, steps // 10),
            eval_every=self.eval_every or min(steps, machine["eval_every"]),
            checkpoint_every=self.checkpoint_every or min(steps, machine["checkpoint_every"]),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; the options are {sorted(names)}")
        values = dict(values)
        for name in ("data", "adam_betas"):  # lists from a file or argparse; other values fail the type check
            value = values.get(name)
            if isinstance(value, str):
                values[name] = (value,)
            elif isinstance(value, list):
                values[name] = tuple(value)
        return cls(**values)

    @classmethod
    def from_file(cls, path: str, **overrides) -> "TrainConfig":
        """A YAML (.yaml/.yml) or JSON file of TrainConfig fields; `overrides` win."""
        return cls.from_dict({**read_config_file(path), **overrides})


def read_config_file(path: str) -> dict:
    """The option values of a YAML (.yaml/.yml) or JSON file; TrainConfig checks them."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as error:
                raise ValueError(f"config file {path!r} is not valid YAML: {error}") from None
        else:
            try:
                values = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"config file {path!r} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of option names to values")
    return values


def with_saved_run_options(values: dict) -> dict:
    """`values`, completed from the run directory's train_config.json when they resume one that has it: what
    neither the command line nor --config sets is what the run was started with, so `--resume --output-dir DIR`
    alone continues it (a value given that differs still fails the resume check, naming it)."""
    if not values.get("resume") or not values.get("output_dir"):
        return values
    path = os.path.join(values["output_dir"], TRAIN_CONFIG_NAME)
    if not os.path.isfile(path):
        return values
    saved = read_config_file(path)
    return {**{name: value for name, value in saved.items() if name not in PER_INVOCATION_OPTIONS}, **values}


"""nn.Modules built on electra_ext.ops, with HF transformers' parameter names, and their configuration."""
from electra_ext.modules.config import PRESETS, ElectraConfig, ElectraPreset, preset
from electra_ext.modules.discriminator_head import DiscriminatorHead

__all__ = ["PRESETS", "DiscriminatorHead", "ElectraConfig", "ElectraPreset", "preset"]

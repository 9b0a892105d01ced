"""nn.Modules built on electra_ext.ops, with HF transformers' parameter names."""
from electra_ext.modules.discriminator_head import DiscriminatorHead

__all__ = ["DiscriminatorHead"]

"""Custom operators (torch.ops.electra_ext.*) with their autograd and fake kernels, and their references."""
from electra_ext.ops import backend, reference
from electra_ext.ops.backend import has_kernel
from electra_ext.ops.disc_head import disc_head, disc_head_from_ids

__all__ = ["backend", "disc_head", "disc_head_from_ids", "has_kernel", "reference"]

"""Custom operators (torch.ops.electra_ext.*) with their autograd and fake kernels, and their references."""
from electra_ext.ops import reference
from electra_ext.ops.disc_head import disc_head, disc_head_from_ids, has_kernel

__all__ = ["disc_head", "disc_head_from_ids", "has_kernel", "reference"]

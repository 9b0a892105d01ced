"""Custom operators (torch.ops.electra_ext.*) with their autograd and fake kernels, and their references."""
from electra_ext.ops import backend, reference
from electra_ext.ops.attention import attention, attention_qkvpacked, attention_varlen
from electra_ext.ops.backend import has_kernel
from electra_ext.ops.disc_head import disc_head, disc_head_from_ids
from electra_ext.ops.gen_head import GenHeadOutput, gen_head

__all__ = ["GenHeadOutput", "attention", "attention_qkvpacked", "attention_varlen", "backend", "disc_head",
           "disc_head_from_ids", "gen_head", "has_kernel", "reference"]

"""disc_head: the per-token discriminator head of ELECTRA after its H->H dense layer.

    logits_i = gelu(x_i) . w + b            (GELU in erf form, float32 accumulation)
    loss     = mean over valid rows of BCE-with-logits(logits_i, labels_i); 0 when no row is valid

Dtypes and autocast: x may be float32, bfloat16 or float16 and is read in its own dtype; w and b are read as
float32 whatever their dtype, and logits and loss are float32 (float64 x runs the reference: float64). The op is
registered with no autocast rule, so under torch.autocast it receives the dense layer's low-precision output
unchanged and still returns float32 logits and loss. Gradients come back in the dtypes of x, w and b.
"""
import torch

from electra_ext.ops import backend as backends
from electra_ext.ops.eager_autograd import register_autograd
from electra_ext.ops.reference import disc_head_reference

_OP = torch.ops.electra_ext.disc_head
_BACKWARD_OP = torch.ops.electra_ext.disc_head_backward.default

_SELECT = backends.Selector(_OP.default)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # x's, on the CPU and CUDA


def disc_head(x, w, b, labels, valid, *, backend=None):
    """Returns (logits [N] float32, loss float32 scalar); see the module docstring.

    x: [N, H] float32/bfloat16/float16, w: [H], b: [1], labels: [N] bool (token was replaced),
    valid: [N] bool (token is not padding). backend: see electra_ext.ops.backend (None: the default).
    """
    if len({t.device for t in (x, w, b, labels, valid)}) > 1:
        raise ValueError(f"disc_head: x, w, b, labels and valid must be on one device, got {x.device}, {w.device}, "
                         f"{b.device}, {labels.device}, {valid.device}")
    implementation = _SELECT(backend, x.device)
    if implementation == "kernels" and x.is_floating_point() and x.dtype not in KERNEL_DTYPES:
        implementation = "reference"  # float64: as attention and gen_head do
    if implementation == "reference":
        return disc_head_reference(x, w, b, labels, valid)
    return _DISC_HEAD(x, w, b, labels, valid, emulated=implementation == "emulated")


def disc_head_from_ids(x, w, b, corrupted_ids, original_ids, valid, *, backend=None):
    """disc_head with labels computed on the fly: a token is "replaced" where corrupted_ids != original_ids."""
    if corrupted_ids.shape != original_ids.shape:
        raise ValueError(
            f"disc_head_from_ids: corrupted_ids and original_ids must have the same shape, "
            f"got {tuple(corrupted_ids.shape)} and {tuple(original_ids.shape)}"
        )
    return disc_head(x, w, b, (corrupted_ids != original_ids).reshape(-1), valid, backend=backend)


@torch.library.register_fake("electra_ext::disc_head")
def _disc_head_fake(x, w, b, labels, valid, *, emulated=False):
    return x.new_empty((x.shape[0],), dtype=torch.float32), x.new_empty((), dtype=torch.float32)


@torch.library.register_fake("electra_ext::disc_head_backward")
def _disc_head_backward_fake(grad_logits, grad_loss, x, w, logits, labels, valid, *, emulated=False):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        w.new_empty(w.shape, dtype=torch.float32),
        w.new_empty((1,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, w, b, labels, valid = inputs
    logits, _ = output
    ctx.save_for_backward(x, w, logits, labels, valid)
    ctx.b_dtype = b.dtype
    ctx.emulated = keyword_only_inputs["emulated"]


def _backward(ctx, grad_logits, grad_loss):
    x, w, logits, labels, valid = ctx.saved_tensors
    grad_x, grad_w, grad_b = _BACKWARD_OP(grad_logits, grad_loss, x, w, logits, labels, valid,
                                          emulated=ctx.emulated)
    return grad_x, grad_w.to(w.dtype), grad_b.to(ctx.b_dtype), None, None


_DISC_HEAD = register_autograd(_OP, _backward, _setup_context)

"""Each op's autograd formulas, registered with torch.library and run eagerly through a plain autograd.Function.

`torch.library.register_autograd` makes an op differentiable wherever it is called (torch.ops.electra_ext.*,
torch.compile, opcheck), but its eager path is slow for an op called once per encoder layer: the call enters the
dispatcher, comes back to a Python autograd kernel that rebuilds the arguments from the schema, and redispatches.
A torch.autograd.Function whose forward takes ctx (the setup_context form binds every call's arguments with
inspect.signature, which costs as much again), calling the kernels below autograd as torch.library's own forward
does, runs the same formulas with less host time. On this project's 2-core CPU machine, one packed attention
call on [4 tokens, 3, 1, 64] float32, forward + backward through autograd, best of 20 x 1000 calls: 307 us
through torch.library, 223 us through this path, of which the kernels take 45 us; without gradients 43 us
against 31. benchmarks/test_attention_bench.py's "host" shape measures the same per call against SDPA. At
ELECTRA-Small on a GPU the host, not the kernels, sets a layer's pace, and both models call attention once per
layer.

So `register_autograd` registers the formulas with torch.library and returns the op wrapped: an eager call with
gradients runs them through the autograd.Function (its backward marks its results as not differentiable only under
create_graph, the one case where that does anything), one without dispatches below
autograd directly (the default overload, not the packet, which resolves its overload per call), and under
torch.compile the wrapper calls the op itself, so that the compiler sees the registered autograd. torch.func
transforms need the setup_context form, and torch.library's generated Function lacks it too: neither path
supports them.
"""
import torch


class NotDifferentiable(torch.autograd.Function):
    """Passes a backward's results through, under create_graph, as functions of the tensors the forward saved, with
    a backward that raises. torch's once_differentiable makes them functions of the incoming gradients only: for
    torch.autograd.grad(loss, x, create_graph=True), a gradient penalty's usual form, those are constants, so the
    results were constants too and the penalty's own gradient was silently dropped."""

    @staticmethod
    def forward(ctx, message, count, *tensors):
        ctx.message = message
        return tuple(tensor.detach() for tensor in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def register_autograd(op, backward, setup_context):
    """torch.library.register_autograd(op, backward, setup_context=setup_context) for the OpOverloadPacket `op`
    (its default overload); returns a callable with op's signature, every positional argument passed (keyword-only
    ones may be left to their defaults). The backward kernels have no derivative of their own, so on both paths a
    second derivative raises instead of coming back silently wrong."""
    message = (f"{op}: trying to differentiate twice: electra_ext's backward kernels have no derivative of their "
               f"own (a gradient of a gradient, e.g. a gradient penalty, needs one); backend='reference' runs the "
               f"op's PyTorch reference, which has one")

    def backward_once(ctx, *grads):
        if not torch.is_grad_enabled():  # on unless the caller asked for create_graph
            return backward(ctx, *grads)
        with torch.no_grad():
            results = backward(ctx, *grads)
        sources = [tensor for tensor in (*ctx.saved_tensors, *grads) if tensor is not None and tensor.requires_grad]
        computed = [result for result in results if result is not None]
        passed = iter(NotDifferentiable.apply(message, len(computed), *computed, *sources))
        return tuple(None if result is None else next(passed) for result in results)

    overload = op.default
    torch.library.register_autograd(overload, backward_once, setup_context=setup_context)
    schema = overload._schema
    positional = sum(not argument.kwarg_only for argument in schema.arguments)
    keyword_defaults = {argument.name: argument.default_value for argument in schema.arguments
                        if argument.kwarg_only}

    class EagerAutograd(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyword_only, *args):
            with torch._C._AutoDispatchBelowAutograd():
                output = overload(*args, **keyword_only)
            setup_context(ctx, args, keyword_only, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return None, *backward_once(ctx, *grads)

    def call(*args, **keyword_only):
        if len(args) != positional:
            raise TypeError(f"{op}: pass all {positional} positional arguments, got {len(args)}")
        if torch.compiler.is_compiling():
            return op(*args, **keyword_only)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return EagerAutograd.apply({**keyword_defaults, **keyword_only}, *args)
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args, **keyword_only)

    return call

"""reference_path() (benchmarks and parity checks only) really moves a whole model off the compiled kernels: it
depends on electra_ext's internals (a Selector per op module), so a new op, or a change there, must show here."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from electra_ext import ElectraForPretraining
from reference_path import op_selectors, reference_path


class ElectraExtOpCalls(TorchDispatchMode):
    """Records the torch.ops.electra_ext operators that run."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "electra_ext":
            self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


def electra_ext_ops_of_a_step():
    torch.manual_seed(0)
    model = ElectraForPretraining("tiny")
    input_ids = torch.randint(1000, 30000, (2, 16))
    with ElectraExtOpCalls() as calls:
        model(input_ids).loss.backward()
    return calls.names


def test_reference_path_covers_every_op():
    names = {selector.op.name().split("::")[1] for selector in op_selectors()}
    assert {"attention", "disc_head", "gen_head"} <= names, names
    # Outside the context the step runs the kernels of every op (forward and backward) ...
    assert {"attention", "disc_head", "gen_head"} <= {name.split(".")[0] for name in electra_ext_ops_of_a_step()}
    # ... and inside it none at all.
    with reference_path():
        assert electra_ext_ops_of_a_step() == set()
    # Leaving the context restores the kernels.
    assert electra_ext_ops_of_a_step()

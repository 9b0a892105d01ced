"""`with reference_path():` runs every electra_ext op on its pure-PyTorch reference, in this process.

electra_ext reads ELECTRA_EXT_BACKEND once, at import (electra_ext/ops/backend.py): each op module resolves its
default implementation per device type into its `Selector.defaults`, and the models call the ops with
backend=None, so that default is what a whole model runs. To time the kernels and the reference path side by
side in one run, and to train both in one parity test, this swaps every op's defaults for "reference" and
restores them on leaving. It lives in benchmarks/ on purpose: the library's only switch is the environment
variable, and this depends on its internals (a module-level Selector per op module), which
test_reference_path_covers_every_op checks.
"""
import contextlib
import importlib
import pkgutil

import electra_ext.ops
from electra_ext.ops.backend import Selector


def op_selectors() -> list:
    """The Selector of every op module in electra_ext.ops (one per op family: attention, disc_head, ...)."""
    selectors = []
    for module_info in pkgutil.iter_modules(electra_ext.ops.__path__):
        module = importlib.import_module(f"electra_ext.ops.{module_info.name}")
        selectors += [value for value in vars(module).values() if isinstance(value, Selector)]
    return selectors


@contextlib.contextmanager
def reference_path():
    saved = [(selector, dict(selector.defaults)) for selector in op_selectors()]
    try:
        for selector, defaults in saved:
            selector.defaults = {device: "reference" for device in defaults}
        yield
    finally:
        for selector, defaults in saved:
            selector.defaults = defaults

"""Loads the compiled extension electra_ext._C, refusing one built against a different torch.

An extension compiled against one torch release does not work next to another (C++ ABI and operator
registration differ), and the failure can be an obscure undefined symbol or, worse, a crash later. The build
records its torch version in _build_info.py; a mismatch is reported here with the command that rebuilds.
"""
import importlib

import torch

REBUILD_HINT = (
    "Rebuild electra_ext against the installed torch: "
    "`pip install --no-build-isolation --no-deps --force-reinstall .` from the electra_ext source tree."
)


def _load():
    try:
        build_info = importlib.import_module("electra_ext._build_info")
    except ImportError as error:
        raise ImportError(
            "electra_ext is not built (electra_ext/_build_info.py is missing; "
            "importing from an unbuilt source tree?). " + REBUILD_HINT
        ) from error
    if build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"electra_ext was built against torch {build_info.TORCH_VERSION} but torch {torch.__version__} is "
            f"installed. {REBUILD_HINT}"
        )
    try:
        importlib.import_module("electra_ext._C")
    except ImportError as error:
        raise ImportError(f"electra_ext._C failed to load: {error}. {REBUILD_HINT}") from error
    return build_info


BUILD_INFO = _load()

"""The import-time guard: an extension built against another torch must refuse to load, saying how to rebuild."""
import pytest
import torch

import electra_ext
from electra_ext import _build_info, _extension


def test_build_info_matches_running_torch():
    assert electra_ext.BUILD_INFO.TORCH_VERSION == torch.__version__


def test_mismatched_torch_refuses_to_load(monkeypatch):
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "0.0.0+other")
    with pytest.raises(ImportError, match=r"built against torch 0\.0\.0\+other.*--no-build-isolation"):
        _extension._load()


def test_missing_build_info_says_not_built(monkeypatch):
    def fail(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(_extension.importlib, "import_module", fail)
    with pytest.raises(ImportError, match="electra_ext is not built"):
        _extension._load()

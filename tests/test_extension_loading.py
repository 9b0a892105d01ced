"""The import-time guard: an extension built against another torch must refuse to load, saying how to rebuild. And
what runs where the build has no code for the GPU: a GPU older than compute capability 8.0 gets the references."""
import importlib
import types
import warnings

import pytest
import torch

import electra_ext
from electra_ext import _build_info, _extension
from electra_ext.ops import backend


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


# Each op module's Selector (electra_ext.ops.attention etc. are the functions; import_module gives the modules).
OP_SELECTORS = {op: importlib.import_module(f"electra_ext.ops.{op}")._SELECT
                for op in ("attention", "disc_head", "gen_head")}


def pretend_gpu(monkeypatch, name, major, minor):
    """torch.cuda.get_device_properties answers for a GPU this machine need not have."""
    def properties(device):
        assert torch.device(device).type == "cuda"
        return types.SimpleNamespace(name=name, major=major, minor=minor)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(backend, "_CUDA_KERNELS_RUN_ON", {})


@pytest.mark.parametrize("op", sorted(OP_SELECTORS))
def test_a_gpu_older_than_ampere_runs_the_references_with_a_warning(monkeypatch, op):
    """The kernels are built for compute capability 8.0 and newer: on a T4 (7.5) they would fail at launch ("no
    kernel image is available"), so the ops take their references there, and say so; backend="kernels" too (it
    means the reference where no kernel exists)."""
    select = OP_SELECTORS[op]
    cuda = torch.device("cuda", 0)
    pretend_gpu(monkeypatch, "Tesla T4", 7, 5)
    with pytest.warns(UserWarning, match=r"Tesla T4, compute capability 7\.5.*need 8\.0 or newer.*references"):
        assert select(None, cuda) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device
        assert select(None, cuda) == select("kernels", cuda) == select("reference", cuda) == "reference"


@pytest.mark.parametrize("op", sorted(OP_SELECTORS))
@pytest.mark.parametrize("gpu", [("NVIDIA A100", 8, 0), ("NVIDIA GeForce RTX 4090", 8, 9), ("NVIDIA H200", 9, 0),
                                 ("NVIDIA B200", 10, 0)])
def test_ampere_and_newer_gpus_run_the_kernels(monkeypatch, op, gpu):
    """Built with CUDA kernels (sm_80 and sm_90 code, and compute_90 PTX for newer GPUs), every GPU from compute
    capability 8.0 on runs them, silently; built without, the references."""
    pretend_gpu(monkeypatch, *gpu)
    built = "kernels" if electra_ext.BUILD_INFO.WITH_CUDA else "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert OP_SELECTORS[op](None, torch.device("cuda", 0)) == built
        assert OP_SELECTORS[op]("kernels", torch.device("cuda", 0)) == built

"""model_flops.py against PyTorch's own count: torch.utils.flop_counter.FlopCounterMode counts the matrix
products a training step of the model (on its reference path, where every product is an aten op) runs,
forward and backward."""
import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from electra_ext import ElectraForPretraining
from electra_ext.modules.pretraining import ElectraPretrainingConfig
from model_flops import training_flops_per_token
from reference_path import reference_path


def tiny_with_embedding_size_equal_to_hidden_size():
    """Like base: the discriminator has no embeddings_project (E = H), the smaller generator has one."""
    tiny = ElectraPretrainingConfig.from_preset("tiny")
    size = tiny.discriminator.hidden_size
    return dataclasses.replace(tiny, discriminator=dataclasses.replace(tiny.discriminator, embedding_size=size),
                               generator=dataclasses.replace(tiny.generator, embedding_size=size))


@pytest.mark.parametrize("seq_len, config", [(64, "tiny"), (128, "tiny"), (128, "tiny E=H")])
def test_model_flops_match_the_products_a_step_runs(seq_len, config):
    torch.manual_seed(0)
    model = ElectraForPretraining(tiny_with_embedding_size_equal_to_hidden_size() if config == "tiny E=H" else config)
    assert (model.config.discriminator.embedding_size == model.config.discriminator.hidden_size) == (config != "tiny")
    batch = 2
    input_ids = torch.randint(1000, 30000, (batch, seq_len))
    with reference_path(), FlopCounterMode(display=False) as counter:
        model(input_ids).loss.backward()
    # The discriminator's H -> 1 layer runs as a matrix-vector product (aten.mv), which FlopCounterMode has no
    # formula for: 2 H per token forward, twice that backward.
    uncounted = 3 * 2 * model.config.discriminator.hidden_size * batch * seq_len
    expected = training_flops_per_token(model.config, seq_len) * batch * seq_len
    assert counter.get_total_flops() + uncounted == pytest.approx(expected, rel=1e-9)


def test_model_flops_of_the_presets():
    """The numbers model_flops.py's docstring quotes (the formula is checked against PyTorch's count above)."""
    small, base = (ElectraPretrainingConfig.from_preset(name) for name in ("small", "base"))
    assert training_flops_per_token(small, 128) / 1e6 == pytest.approx(70.2, abs=0.05)
    assert training_flops_per_token(base, 512) / 1e6 == pytest.approx(668, abs=0.5)

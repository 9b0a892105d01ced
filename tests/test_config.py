"""ElectraConfig and the presets: the reference code's values, validation, and config.json interop with HF."""
import dataclasses
import json

import pytest
import transformers

from electra_ext import PRESETS, ElectraConfig, preset

# (hidden, layers, heads, FFN, embedding, generator fraction, mask prob, lr, batch, seq): the ELECTRA paper's
# and reference code's table (Clark et al. 2020, appendix; google-research/electra configure_pretraining.py).
REFERENCE = {
    "small": (256, 12, 4, 1024, 128, 1 / 4, 0.15, 5e-4, 128, 128),
    "base": (768, 12, 12, 3072, 768, 1 / 3, 0.15, 2e-4, 256, 512),
    "large": (1024, 24, 16, 4096, 1024, 1 / 4, 0.25, 2e-4, 2048, 512),
}
# Generator (hidden, heads, FFN) of each size under the reference rule.
REFERENCE_GENERATOR = {"small": (64, 1, 256), "base": (256, 4, 1024), "large": (256, 4, 1024)}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_presets_carry_the_reference_values(name):
    p = preset(name)
    d = p.discriminator
    assert (d.hidden_size, d.num_hidden_layers, d.num_attention_heads, d.intermediate_size, d.embedding_size,
            p.generator_fraction, p.mask_prob, p.learning_rate, p.batch_size, p.max_seq_length) == REFERENCE[name]
    assert (d.vocab_size, d.layer_norm_eps, d.hidden_dropout_prob, d.attention_probs_dropout_prob) == (
        30522, 1e-12, 0.1, 0.1)
    assert d.head_dim == 64
    g = p.generator
    assert (g.hidden_size, g.num_attention_heads, g.intermediate_size) == REFERENCE_GENERATOR[name]
    assert (g.num_hidden_layers, g.embedding_size, g.vocab_size) == (
        d.num_hidden_layers, d.embedding_size, d.vocab_size)


def test_tiny_preset_is_small_and_valid():
    tiny = preset("tiny")
    assert tiny.discriminator.num_hidden_layers <= 2 and tiny.discriminator.hidden_size <= 128
    assert tiny.generator.num_attention_heads >= 1
    assert set(PRESETS) == {"tiny", "small", "base", "large"}
    with pytest.raises(ValueError, match="preset must be one of tiny, small, base, large"):
        preset("huge")


BAD_CONFIGS = [
    (dict(hidden_size=100, num_attention_heads=3), "hidden_size (100) must be divisible by num_attention_heads (3)"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(num_hidden_layers=-1), "num_hidden_layers must be a positive integer"),
    (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
    (dict(hidden_act="relu"), "hidden_act must be 'gelu'"),
    (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob must be in [0, 1)"),
    (dict(attention_probs_dropout_prob=-0.1), "attention_probs_dropout_prob must be in [0, 1)"),
    (dict(attention_probs_dropout_prob=0.001), "attention_probs_dropout_prob must be 0 or in [1/512, 511/512)"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps must be a positive number"),
    (dict(initializer_range=float("nan")), "initializer_range must be a positive number"),
    (dict(pad_token_id=30522), "pad_token_id must be an integer in [0, vocab_size=30522)"),
]


@pytest.mark.parametrize("changes,message", BAD_CONFIGS)
def test_invalid_config_names_the_field(changes, message):
    with pytest.raises(ValueError) as raised:
        ElectraConfig(**changes)
    assert message in str(raised.value)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_generator_fraction_must_be_in_zero_one(fraction):
    with pytest.raises(ValueError, match="generator fraction must be in"):
        ElectraConfig().generator(fraction)


def test_save_load_round_trip(tmp_path):
    config = preset("base").generator
    file = config.save(str(tmp_path / "model"))
    assert ElectraConfig.load(file) == config
    assert ElectraConfig.load(str(tmp_path / "model")) == config


def test_config_json_interop_with_transformers(tmp_path):
    ours = dataclasses.replace(preset("small").discriminator, pad_token_id=3, max_position_embeddings=256)
    ours.save(str(tmp_path / "ours"))
    theirs = transformers.ElectraConfig.from_pretrained(str(tmp_path / "ours"))
    for field in dataclasses.fields(ElectraConfig):
        assert getattr(theirs, field.name) == getattr(ours, field.name), field.name
    # And back: a config transformers wrote (with its extra keys) loads into ours unchanged.
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert ElectraConfig.load(str(tmp_path / "theirs")) == ours


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file"):
        ElectraConfig.load(str(tmp_path / "missing"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ElectraConfig.load(str(tmp_path / "broken.json"))
    (tmp_path / "bert.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type must be 'electra'"):
        ElectraConfig.load(str(tmp_path / "bert.json"))

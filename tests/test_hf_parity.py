"""electra_ext's discriminator and generator against HF transformers: same weights give the same logits and
gradients (fp32, dropout off, max abs difference <= 1e-5), and checkpoints move both ways without loss."""
import dataclasses
import os

import pytest
import torch
import transformers

from electra_ext import ElectraConfig, ElectraDiscriminator, ElectraForPretraining, ElectraGenerator, preset
from electra_ext.modules.hf_io import load_into

TOLERANCE = 1e-5
# The tiny preset, and ELECTRA-Small's discriminator and (paper-size) generator, with fewer layers to keep
# CI fast: the layer count does not change any code path.
CONFIGS = {
    "tiny": preset("tiny").discriminator,
    "tiny-generator": preset("tiny").generator,
    "small": dataclasses.replace(preset("small").discriminator, num_hidden_layers=3),
    "small-generator": dataclasses.replace(preset("small").generator, num_hidden_layers=3),
}


def hf_config(config: ElectraConfig):
    return transformers.ElectraConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"},
                                      attn_implementation="eager")


def batch(config: ElectraConfig, padded: bool, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, config.vocab_size, (3, 37), generator=generator)
    token_type_ids = torch.randint(0, config.type_vocab_size, (3, 37), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if padded:
        for row, length in enumerate((37, 20, 1)):
            attention_mask[row, length:] = 0
            input_ids[row, length:] = config.pad_token_id
    return input_ids, attention_mask, token_type_ids


def assert_gradients_match(ours, theirs):
    their_parameters = dict(theirs.named_parameters())
    compared = 0
    for name, parameter in ours.named_parameters():
        their_grad = their_parameters[name].grad
        assert parameter.grad is not None and their_grad is not None, name
        difference = (parameter.grad - their_grad).abs().max().item()
        assert difference <= TOLERANCE, f"{name}: max abs gradient difference {difference:.3g}"
        compared += 1
    assert compared == len(their_parameters) - ("generator_lm_head.weight" in their_parameters
                                                and "generator_lm_head.weight" not in dict(ours.named_parameters()))


def assert_matches_transformers(ours_class, their_class, config, padded, labels_for):
    """Same weights, same batch: logits at the valid positions, the loss and every gradient agree."""
    torch.manual_seed(1)
    theirs = their_class(hf_config(config)).eval()
    ours = ours_class(config).eval()
    load_into(ours, theirs.state_dict(), "HF model")
    input_ids, attention_mask, token_type_ids = batch(config, padded)
    labels = labels_for(input_ids, attention_mask)
    their_out = theirs(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels)
    our_out = ours(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels)
    valid = attention_mask.bool()
    assert our_out.logits.shape == their_out.logits.shape
    assert (our_out.logits - their_out.logits)[valid].abs().max().item() <= TOLERANCE
    assert abs(our_out.loss.item() - their_out.loss.item()) <= TOLERANCE
    their_out.loss.backward()
    our_out.loss.backward()
    assert_gradients_match(ours, theirs)


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
@pytest.mark.parametrize("name", ["tiny", "small"])
def test_discriminator_matches_transformers(name, padded):
    def replaced_labels(input_ids, attention_mask):
        return torch.randint(0, 2, input_ids.shape, generator=torch.Generator().manual_seed(2))

    assert_matches_transformers(ElectraDiscriminator, transformers.ElectraForPreTraining, CONFIGS[name], padded,
                                replaced_labels)


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
@pytest.mark.parametrize("name", ["tiny-generator", "small-generator"])
def test_generator_matches_transformers(name, padded):
    def masked_lm_labels(input_ids, attention_mask):
        chosen = torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(3)) < 0.3
        return torch.where(chosen & attention_mask.bool(), input_ids, torch.full_like(input_ids, -100))

    assert_matches_transformers(ElectraGenerator, transformers.ElectraForMaskedLM, CONFIGS[name], padded,
                                masked_lm_labels)


@pytest.mark.parametrize("ours_class,their_class", [
    (ElectraDiscriminator, transformers.ElectraForPreTraining), (ElectraGenerator, transformers.ElectraForMaskedLM)])
def test_hidden_dropout_matches_transformers_in_training(ours_class, their_class):
    """In training, with the same seed, hidden dropout draws the same masks at the same places as HF (after the
    embeddings' LayerNorm, before each residual add): the eval-mode tests cannot see dropout moved or missing.
    Attention dropout is off: the attention op draws its own (Philox) masks."""
    config = dataclasses.replace(CONFIGS["tiny"], attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.1)
    torch.manual_seed(1)
    theirs, ours = their_class(hf_config(config)), ours_class(config)
    load_into(ours, theirs.state_dict(), "HF model")
    input_ids, attention_mask, token_type_ids = batch(config, padded=True)
    logits = []
    for model, training in ((theirs, True), (ours, True), (ours, False)):
        torch.manual_seed(5)
        model.train(training)
        logits.append(model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits)
    valid = attention_mask.bool()
    assert (logits[1] - logits[0])[valid].abs().max().item() <= TOLERANCE
    assert (logits[2] - logits[0])[valid].abs().max().item() > 100 * TOLERANCE  # dropout did change the logits


def test_generator_masked_lm_head_matches_full_logits():
    """The pre-training path (gen_head on the chosen rows only) gives HF's loss and log-sum-exp there."""
    config = CONFIGS["small-generator"]
    torch.manual_seed(4)
    theirs = transformers.ElectraForMaskedLM(hf_config(config)).eval()
    ours = ElectraGenerator(config).eval()
    load_into(ours, theirs.state_dict(), "HF model")
    input_ids, attention_mask, token_type_ids = batch(config, padded=True)
    positions = torch.tensor([[3, 10, 30], [0, 5, 19], [0, 0, 0]])
    targets = torch.tensor([[7, 8, 9], [10, -100, 12], [13, -100, -100]])
    head = ours.masked_lm(input_ids, attention_mask, token_type_ids, positions, targets)

    labels = torch.full_like(input_ids, -100).scatter(1, positions, targets)
    labels[2, 0] = 13
    their_out = theirs(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels)
    assert abs(head.loss.item() - their_out.loss.item()) <= TOLERANCE
    rows = their_out.logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, config.vocab_size)).flatten(0, 1)
    assert (head.lse - torch.logsumexp(rows, dim=-1)).abs().max().item() <= TOLERANCE
    counted = targets.flatten() != -100
    assert head.num_correct.item() == ((rows.argmax(-1) == targets.flatten()) & counted).sum().item()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


@pytest.mark.parametrize("ours_class,their_class", [(ElectraDiscriminator, transformers.ElectraForPreTraining),
                                                    (ElectraGenerator, transformers.ElectraForMaskedLM)])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
def test_round_trip_through_transformers(tmp_path, ours_class, their_class, safe):
    config = CONFIGS["tiny"]
    torch.manual_seed(5)
    ours = ours_class(config)
    ours.save_pretrained(str(tmp_path / "ours"), safe_serialization=safe)
    theirs, info = their_class.from_pretrained(str(tmp_path / "ours"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = ours_class.from_pretrained(str(tmp_path / "theirs"))
    assert back.config == ours.config
    assert_same_state(ours, back)
    if ours_class is ElectraGenerator:
        assert back.generator_lm_head.weight is back.electra.embeddings.word_embeddings.weight


def test_from_pretrained_tolerates_legacy_buffers_and_omitted_tied_head(tmp_path):
    """What real checkpoints contain: a `position_ids` buffer (older transformers) and, in safetensors
    files, no `generator_lm_head.weight` (it is the word embeddings)."""
    config = CONFIGS["tiny-generator"]
    torch.manual_seed(6)
    original = ElectraGenerator(config)
    state = {k: v.clone() for k, v in original.state_dict().items() if k != "generator_lm_head.weight"}
    state["electra.embeddings.position_ids"] = torch.arange(config.max_position_embeddings).unsqueeze(0)
    directory = tmp_path / "legacy"
    directory.mkdir()
    torch.save(state, directory / "pytorch_model.bin")
    config.save(str(directory))
    assert_same_state(original, ElectraGenerator.from_pretrained(str(directory)))


def test_from_pretrained_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="local HF-format directories only"):
        ElectraDiscriminator.from_pretrained("google/electra-small-discriminator")
    config = CONFIGS["tiny"]
    ElectraGenerator(config).save_pretrained(str(tmp_path / "generator"))
    with pytest.raises(ValueError, match="missing keys .*discriminator_predictions"):
        ElectraDiscriminator.from_pretrained(str(tmp_path / "generator"))
    os.remove(tmp_path / "generator" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        ElectraGenerator.from_pretrained(str(tmp_path / "generator"))
    # An untied output layer (another model's) cannot be loaded into the tied one without losing one of the two.
    state = ElectraGenerator(config).state_dict()
    state["generator_lm_head.weight"] = state["generator_lm_head.weight"] + 1
    with pytest.raises(ValueError, match="generator_lm_head.weight differs from "
                                         "electra.embeddings.word_embeddings.weight"):
        load_into(ElectraGenerator(config), state, "a checkpoint")


@pytest.mark.parametrize("sharing", ["tied", "untied", "gdes"])
def test_joint_model_exports_load_in_transformers(tmp_path, sharing):
    torch.manual_seed(7)
    model = ElectraForPretraining("tiny", sharing=sharing)
    with torch.no_grad():  # make any GDES residual non-zero, so the export must add it
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.eval()
    model.save_discriminator(str(tmp_path / "discriminator"))
    model.save_generator(str(tmp_path / "generator"))
    input_ids, attention_mask, token_type_ids = batch(model.config.discriminator, padded=True)
    valid = attention_mask.bool()
    for directory, their_class, ours in (("discriminator", transformers.ElectraForPreTraining, model.discriminator),
                                         ("generator", transformers.ElectraForMaskedLM, model.generator)):
        theirs, info = their_class.from_pretrained(str(tmp_path / directory), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        expected = ours(input_ids, attention_mask, token_type_ids).logits
        actual = theirs.eval()(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
        assert (expected - actual)[valid].abs().max().item() <= TOLERANCE, directory


@pytest.mark.parametrize("sharing", ["tied", "untied", "gdes"])
def test_joint_model_round_trip(tmp_path, sharing):
    torch.manual_seed(8)
    model = ElectraForPretraining("tiny", sharing=sharing, mask_prob=0.2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(str(tmp_path / "joint"))
    back = ElectraForPretraining.from_pretrained(str(tmp_path / "joint"))
    assert back.config == model.config
    assert_same_state(model, back)
    # Sharing survives loading: the tied tables are one tensor again.
    same = back.discriminator.electra.embeddings is back.generator.electra.embeddings
    assert same == (sharing == "tied")


@pytest.mark.parametrize("their_class", [transformers.ElectraModel, transformers.ElectraForSequenceClassification,
                                         transformers.ElectraForTokenClassification])
def test_the_exported_discriminator_is_fine_tuned_as_users_load_it(tmp_path, their_class):
    """What a pre-trained discriminator is for: transformers' task classes take its encoder as it is (same
    hidden states) and add only their own head; the RTD head is the one part they leave out."""
    torch.manual_seed(9)
    model = ElectraForPretraining("tiny")
    model.eval()
    model.save_discriminator(str(tmp_path / "discriminator"))
    theirs, info = their_class.from_pretrained(str(tmp_path / "discriminator"), output_loading_info=True)
    assert not info["mismatched_keys"], info
    assert all(key.startswith("classifier.") for key in info["missing_keys"]), info
    assert info["unexpected_keys"] and all(key.startswith("discriminator_predictions.")
                                           for key in info["unexpected_keys"]), info
    assert bool(info["missing_keys"]) == (their_class is not transformers.ElectraModel), info
    input_ids, attention_mask, token_type_ids = batch(model.config.discriminator, padded=True)
    expected = model.discriminator(input_ids, attention_mask, token_type_ids).last_hidden_state
    encoder = theirs.eval() if their_class is transformers.ElectraModel else theirs.eval().electra
    actual = encoder(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
    valid = attention_mask.bool()
    assert (expected - actual)[valid].abs().max().item() <= TOLERANCE

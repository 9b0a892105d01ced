"""ElectraForPretraining: the reference masking procedure (counts, exclusions, the 85/15 and 80/10/10 splits),
the label rule, the loss composition against an fp64 computation, the three sharing modes, torch.compile of
forward and backward without graph breaks, the CUDA kernels (emulated) in the model, and shape-only runs."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

from electra_ext import ElectraDiscriminator, ElectraForPretraining, ElectraPretrainingConfig
from electra_ext.modules import mask_tokens
from electra_ext.modules.electra import seqlens_from_attention_mask

CLS, SEP, MASK, PAD = 101, 102, 103, 0


def sentence_batch(batch=6, seq_len=64, lengths=(64, 50, 13, 3, 2, 0), seed=0):
    """[CLS] tokens [SEP] tokens [SEP] rows padded to seq_len; lengths are the non-pad tokens per row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 30000, (batch, seq_len), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
        input_ids[row, length:] = PAD
        if length:
            input_ids[row, 0] = CLS
            input_ids[row, length - 1] = SEP
        if length > 8:
            input_ids[row, length // 2] = SEP
    return input_ids, attention_mask


TINY = ElectraPretrainingConfig.from_preset("tiny")


def expected_count(config, input_ids, attention_mask):
    """The reference code's k = max(1, min(P, round(p · non-pad))) capped by the candidates available."""
    slots = int((config.mask_prob + 0.005) * input_ids.shape[1])
    non_pad = attention_mask.sum(1)
    candidates = ((attention_mask == 1) & ~torch.isin(input_ids, torch.tensor([CLS, SEP, MASK, PAD]))).sum(1)
    wanted = [max(1, min(slots, round(config.mask_prob * n))) for n in non_pad.tolist()]
    return [min(w, c) for w, c in zip(wanted, candidates.tolist())]


@pytest.mark.parametrize("mask_prob", [0.15, 0.25])
def test_masking_selects_the_reference_count_among_candidates(mask_prob):
    config = ElectraPretrainingConfig.from_preset("tiny", mask_prob=mask_prob)
    input_ids, attention_mask = sentence_batch()
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        batch = mask_tokens(input_ids, attention_mask, config, generator)
        assert batch.selected.sum(1).tolist() == expected_count(config, input_ids, attention_mask)
        assert not batch.selected[torch.isin(input_ids, torch.tensor([CLS, SEP, PAD]))].any()
        assert not batch.selected[attention_mask == 0].any()
        used = batch.targets != -100
        assert torch.equal(batch.targets[used], input_ids.gather(1, batch.positions)[used])
        assert torch.equal(used.sum(1), batch.selected.sum(1))
        # Outside the chosen positions the generator sees the original tokens.
        assert torch.equal(batch.masked_ids[~batch.selected], input_ids[~batch.selected])


def test_masking_never_selects_mask_tokens_and_handles_empty_rows():
    input_ids, attention_mask = sentence_batch()
    input_ids[0, 1:40] = MASK
    batch = mask_tokens(input_ids, attention_mask, TINY, torch.Generator().manual_seed(2))
    assert not batch.selected[input_ids == MASK].any()
    # Rows 4 ([CLS] [SEP]) and 5 (all padding) have no candidate: nothing chosen, every slot unused.
    assert batch.selected[4:].sum() == 0 and (batch.targets[4:] == -100).all()


def binomial_z(successes, trials, p):
    return (successes - trials * p) / math.sqrt(trials * p * (1 - p))


def test_electra_masking_split_is_85_15_and_selection_uniform():
    input_ids, attention_mask = sentence_batch(batch=1, seq_len=128, lengths=(128,))
    generator = torch.Generator().manual_seed(3)
    draws = 2000
    chosen = torch.zeros(128)
    masked = total = 0
    for _ in range(draws):
        batch = mask_tokens(input_ids, attention_mask, TINY, generator)
        chosen += batch.selected[0]
        masked += (batch.masked_ids[batch.selected] == MASK).sum().item()
        total += batch.selected.sum().item()
        assert torch.equal(batch.masked_ids[batch.selected & (batch.masked_ids != MASK)],
                           input_ids[batch.selected & (batch.masked_ids != MASK)])
    assert abs(binomial_z(masked, total, 0.85)) < 4
    # Each of the 125 candidates is equally likely: chi-square with 124 degrees of freedom; 200 is far in
    # the tail (p < 1e-4) for a uniform selection.
    candidates = torch.ones(128, dtype=torch.bool)
    candidates[[0, 64, 127]] = False
    counts = chosen[candidates]
    expected = counts.sum() / candidates.sum()
    assert chosen[~candidates].sum() == 0
    assert ((counts - expected) ** 2 / expected).sum().item() < 200


def test_bert_masking_split_is_80_10_10():
    config = ElectraPretrainingConfig.from_preset("tiny", masking="bert")
    input_ids, attention_mask = sentence_batch(batch=1, seq_len=128, lengths=(128,))
    generator = torch.Generator().manual_seed(4)
    outcomes = torch.zeros(3)
    for _ in range(2000):
        batch = mask_tokens(input_ids, attention_mask, config, generator)
        new = batch.masked_ids[batch.selected]
        old = input_ids[batch.selected]
        is_mask = new == MASK
        outcomes += torch.tensor([is_mask.sum(), (~is_mask & (new != old)).sum(), (new == old).sum()])
    total = outcomes.sum().item()
    # A random token equals the original with probability 1/30522: the unchanged share is 10% + 10%/V.
    for count, p in zip(outcomes.tolist(), (0.8, 0.1 * (1 - 1 / 30522), 0.1 * (1 + 1 / 30522))):
        assert abs(binomial_z(count, total, p)) < 4


def test_label_rule_and_corruption():
    torch.manual_seed(5)
    model = ElectraForPretraining("tiny").eval()
    input_ids, attention_mask = sentence_batch()
    out = model(input_ids, attention_mask, generator=torch.Generator().manual_seed(6))
    assert torch.equal(out.replaced, out.corrupted_ids != input_ids)
    # Only chosen positions change: never padding, [CLS] or [SEP].
    assert not out.replaced[torch.isin(input_ids, torch.tensor([CLS, SEP, PAD]))].any()
    assert out.replaced.sum(1).le(torch.tensor(expected_count(TINY, input_ids, attention_mask))).all()
    assert out.replaced.any()


def test_a_correct_sample_counts_as_real():
    """Every token is the same word and the generator's bias makes it the certain draw: the corrupted input
    equals the original, nothing is labelled replaced, and every sample counts as correct."""
    torch.manual_seed(7)
    model = ElectraForPretraining("tiny").eval()
    input_ids = torch.full((2, 32), 2000)
    input_ids[:, 0], input_ids[:, -1] = CLS, SEP
    with torch.no_grad():
        model.generator.generator_lm_head.bias[2000] = 1e4
    out = model(input_ids)
    assert torch.equal(out.corrupted_ids, input_ids)
    assert not out.replaced.any()
    assert out.metrics["sampled_accuracy"].item() == 1.0 and out.metrics["mlm_accuracy"].item() == 1.0
    assert out.metrics["replaced_fraction"].item() == 0.0


def test_the_generator_samples_at_the_configured_temperature():
    """Two candidate tokens whose logits differ by exactly 1 (equal embedding rows, biases 30 and 29; every other
    token e^-29 behind): at temperature 1 the better is drawn with probability 1 / (1 + e^-1) = 0.73, at 0.05
    (a gap of 20) always."""
    accuracies = {}
    for temperature in (1.0, 0.05):
        torch.manual_seed(7)
        model = ElectraForPretraining("tiny", temperature=temperature).eval()
        input_ids = torch.full((16, 128), 2000)
        input_ids[:, 0], input_ids[:, -1] = CLS, SEP
        with torch.no_grad():
            words = model.generator.electra.embeddings.word_embeddings.weight
            words[2001] = words[2000]
            model.generator.generator_lm_head.bias[2000], model.generator.generator_lm_head.bias[2001] = 30.0, 29.0
        out = model(input_ids, generator=torch.Generator().manual_seed(3))
        accuracies[temperature] = out.metrics["sampled_accuracy"].item()
    # ~300 draws at temperature 1: 0.73 within 5 standard deviations (0.026 each).
    assert 0.6 < accuracies[1.0] < 0.86 and accuracies[0.05] == 1.0, accuracies


def test_loss_composition_and_metrics_against_fp64():
    torch.manual_seed(8)
    config = ElectraPretrainingConfig.from_preset("tiny", gen_weight=1.5, disc_weight=40.0)
    model = ElectraForPretraining(config).eval()
    input_ids, attention_mask = sentence_batch()
    token_type_ids = (torch.arange(64) > 30).long().expand(6, -1)
    seed = 9
    out = model(input_ids, attention_mask, token_type_ids, generator=torch.Generator().manual_seed(seed))
    # Redo the step by hand: the same draws (masking consumes the generator first), full-vocabulary logits.
    batch = mask_tokens(input_ids, attention_mask, config, torch.Generator().manual_seed(seed))
    logits = model.generator(batch.masked_ids, attention_mask, token_type_ids).logits.double()
    rows = logits.gather(1, batch.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).flatten(0, 1)
    targets = batch.targets.flatten()
    counted = targets != -100
    mlm = F.cross_entropy(rows[counted], targets[counted])
    valid = attention_mask.bool()
    disc_logits = model.discriminator(out.corrupted_ids, attention_mask, token_type_ids).logits.double()
    rtd = F.binary_cross_entropy_with_logits(disc_logits[valid], out.replaced[valid].double())
    assert abs(out.mlm_loss.item() - mlm.item()) <= 1e-5 * mlm.item()
    assert abs(out.rtd_loss.item() - rtd.item()) <= 1e-5 * rtd.item()
    total = 1.5 * mlm + 40.0 * rtd
    assert abs(out.loss.item() - total.item()) <= 1e-5 * total.item()

    predicted = disc_logits > 0
    replaced = out.replaced
    samples = out.corrupted_ids.gather(1, batch.positions).flatten()
    expected = {
        "mlm_accuracy": (rows.argmax(-1) == targets)[counted].double().mean(),
        "sampled_accuracy": (samples == targets)[counted].double().mean(),
        "disc_accuracy": (predicted == replaced)[valid].double().mean(),
        "disc_precision": (predicted & replaced & valid).sum() / max(1, (predicted & valid).sum().item()),
        "disc_recall": (predicted & replaced & valid).sum() / max(1, (replaced & valid).sum().item()),
        "replaced_fraction": replaced[valid].double().mean(),
        "num_masked": counted.sum(),
        "num_tokens": valid.sum(),
    }
    assert out.metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert out.metrics[name].item() == pytest.approx(value.item(), abs=1e-6), name


def embedding_tables(embeddings):
    return [embeddings.word_embeddings, embeddings.position_embeddings, embeddings.token_type_embeddings]


def test_tied_sharing_holds_one_table_and_ties_the_output_layer():
    model = ElectraForPretraining("tiny", sharing="tied")
    assert model.discriminator.electra.embeddings is model.generator.electra.embeddings
    assert model.generator.generator_lm_head.weight is model.discriminator.electra.embeddings.word_embeddings.weight
    shared = {id(p) for p in model.generator.parameters()} & {id(p) for p in model.discriminator.parameters()}
    assert len(shared) == 5  # three tables and the LayerNorm's weight and bias


def test_untied_sharing_shares_nothing():
    model = ElectraForPretraining("tiny", sharing="untied")
    assert not {id(p) for p in model.generator.parameters()} & {id(p) for p in model.discriminator.parameters()}
    assert model.generator.generator_lm_head.weight is model.generator.electra.embeddings.word_embeddings.weight


def test_gdes_keeps_the_rtd_loss_off_the_shared_tables():
    torch.manual_seed(10)
    model = ElectraForPretraining("tiny", sharing="gdes").eval()
    input_ids, attention_mask = sentence_batch()
    out = model(input_ids, attention_mask)
    shared = [table.weight for table in embedding_tables(model.generator.electra.embeddings)]
    residuals = [table.residual for table in embedding_tables(model.discriminator.electra.embeddings)]
    rtd_grads = torch.autograd.grad(out.rtd_loss, shared + residuals, allow_unused=True, retain_graph=True)
    for grad in rtd_grads[:3]:
        assert grad is None or not grad.any()
    assert rtd_grads[3].abs().sum() > 0  # the discriminator does learn through its residual
    # And the full loss moves the shared tables exactly as the MLM loss alone does.
    full = torch.autograd.grad(out.loss, shared, retain_graph=True)
    mlm = torch.autograd.grad(model.config.gen_weight * out.mlm_loss, shared)
    for a, b in zip(full, mlm):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    # At initialisation (zero residuals) the discriminator sees the generator's tables.
    for table in embedding_tables(model.discriminator.electra.embeddings):
        assert torch.equal(table.weight, table.shared.weight)


def test_tied_sharing_lets_both_losses_reach_the_table():
    torch.manual_seed(11)
    model = ElectraForPretraining("tiny", sharing="tied").eval()
    out = model(*sentence_batch())
    word = model.generator.electra.embeddings.word_embeddings.weight
    (rtd_grad,) = torch.autograd.grad(out.rtd_loss, [word])
    assert rtd_grad.abs().sum() > 0


BAD_CONFIG = [
    (dict(sharing="shared"), "sharing must be one of tied, untied, gdes"),
    (dict(masking="random"), "masking must be one of electra, bert"),
    (dict(mask_prob=0.0), "mask_prob must be in (0, 0.99)"),
    (dict(temperature=0.0), "temperature must be positive"),
    (dict(mask_token_id=40000), "mask_token_id must be in [0, vocab_size=30522)"),
]


@pytest.mark.parametrize("changes,message", BAD_CONFIG)
def test_bad_pretraining_config_names_the_field(changes, message):
    with pytest.raises(ValueError) as raised:
        ElectraForPretraining("tiny", **changes)
    assert message in str(raised.value)


def test_bad_inputs_get_clear_errors():
    model = ElectraForPretraining("tiny")
    input_ids, attention_mask = sentence_batch()
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model(input_ids, attention_mask[:, :10])
    left_padded = attention_mask.flip(1)
    with pytest.raises(ValueError, match="padding at the end"):
        model(input_ids, left_padded)
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(input_ids.float(), attention_mask)
    with pytest.raises(ValueError, match=r"sequence length must be in \[1, max_position_embeddings=512\]"):
        model(torch.ones(1, 513, dtype=torch.long))


def test_shape_only_runs_read_no_values():
    """FakeTensorMode and the meta device (memory estimates, shape inference) run the models without values: the
    eager checks that read ids, masks, labels and lengths on the host step aside there (they raised before)."""
    model = ElectraForPretraining("tiny")
    input_ids, attention_mask = sentence_batch(batch=3, seq_len=16, lengths=(16, 5, 0))
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = model(input_ids, attention_mask)
        out.loss.backward()
        assert is_fake(out.loss) and out.disc_logits.shape == (3, 16)
    with torch.device("meta"):
        discriminator = ElectraDiscriminator(model.config.discriminator)
    out = discriminator(input_ids.to("meta"), attention_mask.to("meta"), labels=torch.ones(3, 16, device="meta"))
    assert out.loss.device.type == "meta" and out.logits.shape == (3, 16)


def test_a_compiled_model_refuses_left_and_interior_padding_too():
    """Compiled, the mask is checked on the device (no host read in the graph): a left-padded or gapped mask must
    still raise, not be read as a length (it was, silently, before)."""
    compiled = torch.compile(seqlens_from_attention_mask, fullgraph=True)
    input_ids, attention_mask = sentence_batch(batch=3, seq_len=16, lengths=(16, 9, 0))
    assert torch.equal(compiled(attention_mask, input_ids), torch.tensor([16, 9, 0], dtype=torch.int32))
    gapped = attention_mask.clone()
    gapped[1, 4] = 0
    for bad in (attention_mask.flip(1), gapped):
        with pytest.raises(RuntimeError, match="attention_mask must be 1 on a prefix"):
            compiled(bad, input_ids)


def test_compiled_forward_and_backward_match_eager_without_graph_breaks():
    torch.manual_seed(12)
    model = ElectraForPretraining("tiny").eval()
    input_ids, attention_mask = sentence_batch(batch=4, seq_len=32, lengths=(32, 20, 5, 2))

    def step(forward, ids, mask):
        out = forward(ids, mask)
        out.loss.backward()  # through AOTAutograd's compiled backward graph when forward is compiled
        return out.loss.detach(), out.mlm_loss.detach(), out.rtd_loss.detach()

    torch.manual_seed(13)
    eager_losses = step(model, input_ids, attention_mask)
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    # fallback_random: the compiled graph draws from eager's RNG, so masks and samples are the same.
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
        torch.manual_seed(13)
        compiled_losses = step(compiled, input_ids, attention_mask)
    for eager, compiled_value in zip(eager_losses, compiled_losses):
        assert compiled_value.item() == pytest.approx(eager.item(), rel=1e-5)
    for parameter, eager_grad in zip(model.parameters(), eager_grads):
        assert parameter.grad is not None
        assert (parameter.grad - eager_grad).abs().max().item() <= 1e-5 * max(1.0, eager_grad.abs().max().item())


@pytest.mark.parametrize("sharing", ["untied", "gdes"])
def test_other_sharing_modes_trace_without_graph_breaks(sharing):
    """The same full-graph capture for the other sharing modes (aot_eager: tracing, no code generation), on
    two batch shapes: the second makes torch.compile trace with dynamic (symbolic) sizes."""
    torch.manual_seed(14)
    model = ElectraForPretraining("tiny", sharing=sharing).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for batch, seq_len in ((2, 16), (3, 24)):
        model.zero_grad(set_to_none=True)
        out = compiled(*sentence_batch(batch=batch, seq_len=seq_len, lengths=(seq_len, 9, 3)[:batch]))
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert all(p.grad is not None for p in model.parameters())


def test_bf16_autocast_step_is_close_to_fp32():
    torch.manual_seed(15)
    model = ElectraForPretraining("tiny").eval()
    input_ids, attention_mask = sentence_batch()
    torch.manual_seed(16)
    full = model(input_ids, attention_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(16)
        mixed = model(input_ids, attention_mask)
    assert mixed.loss.dtype == torch.float32 and mixed.disc_logits.dtype == torch.float32
    assert mixed.mlm_loss.item() == pytest.approx(full.mlm_loss.item(), rel=1e-2)
    assert mixed.rtd_loss.item() == pytest.approx(full.rtd_loss.item(), rel=1e-2)
    mixed.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("emulated_sm", ["80", "90"])
def test_the_cuda_kernels_in_the_model_are_as_close_to_fp32_as_the_references(monkeypatch, emulated_sm):
    """The GPU run's path on the CPU: the generator and discriminator under bf16 autocast with every op on its CUDA
    kernel's device code (emulated; sm_80 takes the mma.sync attention kernels, sm_90 the wgmma ones), on a batch
    with a one-token row and an all-padding row. Losses, discriminator logits and every parameter's gradient must
    be within 2x (+ 1e-3) of the error that the references' own bf16 run has against an fp32 run (the
    FlashAttention rule, for the model). The op tests check each kernel alone; this checks the model's use of them
    (the packed QKV views, seqlens from the mask, the head's dtypes under autocast, gradient flow to the tables)."""
    torch.manual_seed(21)
    model = ElectraForPretraining("tiny")
    input_ids, attention_mask = sentence_batch(batch=4, seq_len=40, lengths=(40, 17, 1, 0))
    batch = mask_tokens(input_ids, attention_mask, model.config, torch.Generator().manual_seed(22))
    corrupted = input_ids.clone()
    corrupted[:, 5] = 2000  # a fixed corruption: the sampled one would differ between precisions
    replaced = (corrupted != input_ids) & (attention_mask == 1)
    monkeypatch.setenv("ELECTRA_EXT_EMULATED_SM", emulated_sm)

    def run(implementation, dtype):
        for op in ("attention", "disc_head", "gen_head"):
            selector = importlib.import_module(f"electra_ext.ops.{op}")._SELECT
            monkeypatch.setitem(selector.defaults, "cpu", implementation)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(24)  # the same dropout in each run
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            head = model.generator.masked_lm(batch.masked_ids, attention_mask, None, batch.positions, batch.targets,
                                             generator=torch.Generator().manual_seed(23))
            disc = model.discriminator(corrupted, attention_mask, labels=replaced)
            (head.loss + 50 * disc.loss).backward()
        outputs = {"mlm_loss": head.loss.detach().float(), "rtd_loss": disc.loss.detach().float(),
                   "disc_logits": disc.logits.detach().float()[attention_mask == 1]}
        outputs.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        return outputs

    exact = run("reference", torch.float32)
    references = run("reference", torch.bfloat16)
    kernels = run("emulated", torch.bfloat16)
    assert set(kernels) == set(exact) and len(exact) == len(list(model.parameters())) + 3
    # A gradient that is 0 in exact arithmetic (the key biases': softmax ignores a per-row constant) is measured
    # against the largest gradient instead of its own rounding noise.
    floor = 1e-3 * max(float(value.norm()) for value in exact.values())
    for name, value in exact.items():
        scale = max(float(value.norm()), floor)
        kernel_error = float((kernels[name] - value).norm() / scale)
        reference_error = float((references[name] - value).norm() / scale)
        assert kernel_error <= 2 * reference_error + 1e-3, (name, kernel_error, reference_error)


def test_gradient_checkpointing_recomputes_layers_and_changes_nothing():
    """HF's switches: with gradient checkpointing on, a training step runs each encoder layer twice (the forward,
    then again in the backward pass) and gives bitwise the same loss and gradients, dropout included; evaluation
    and no_grad runs do not recompute; disable turns it off."""
    torch.manual_seed(31)
    model = ElectraForPretraining("tiny")
    input_ids, attention_mask = sentence_batch(batch=3, seq_len=24, lengths=(24, 7, 1))
    layer_calls = []
    for layer in model.modules():
        if type(layer).__name__ == "ElectraLayer":
            layer.register_forward_pre_hook(lambda *_: layer_calls.append(1))

    def step():
        layer_calls.clear()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(32)
        out = model(input_ids, attention_mask, generator=torch.Generator().manual_seed(33))
        out.loss.backward()
        return [out.loss.detach()] + [p.grad.clone() for p in model.parameters()], len(layer_calls)

    plain, plain_calls = step()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.discriminator.is_gradient_checkpointing
    recomputed, recomputed_calls = step()
    assert (plain_calls, recomputed_calls) == (4, 8)
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed))
    layer_calls.clear()
    with torch.no_grad():
        model(input_ids, attention_mask)
    model.eval()
    model(input_ids, attention_mask).loss.backward()
    assert len(layer_calls) == 8  # 4 per forward, none recomputed
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing

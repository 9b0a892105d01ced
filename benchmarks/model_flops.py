"""Model FLOPs per token of one ELECTRA pre-training step, for tokens/s -> MFU.

Counted: the matrix products the model needs (2 FLOPs per multiply-add), as in the PaLM paper's MFU
(Chowdhery et al. 2022, appendix B). Not counted: element-wise work (GELU, LayerNorm, softmax, Adam) and
work an implementation adds, such as HF's generator head on all T positions instead of the P masked ones.
So every provider of a step is credited the same FLOPs, and MFU compares like with like.

Forward, per token of a T-token sequence, for one encoder with embedding size E, hidden size H, FFN size I
and L layers:
    embeddings_project (only when E != H)     2 E H
    per layer: Q, K, V projections            3 * 2 H^2
               attention output projection    2 H^2
               FFN, H -> I -> H               2 * 2 H I
               scores q k^T: T keys x H       2 T H      (non-causal: every key, no halving)
               probabilities x V              2 T H
    = 2 E H [E != H] + L (8 H^2 + 4 H I + 4 T H)
The generator head runs on the masked positions only, a fraction P / T of the tokens (P prediction slots per
sequence, all used when there is no padding: 19 of 128, 79 of 512):
    dense H_gen -> E, then the tied output layer E -> V    (P / T) (2 H_gen E + 2 E V)
The discriminator head, on every token: dense H -> H, then H -> 1     2 H^2 + 2 H
Training: the backward of each product is two products of the same size (input and weight gradients), so a
step is 3x the forward. The embedding lookups are not products (0 FLOPs); the input gradient of the first
product is counted although nothing upstream needs it, as PaLM's 6N does.

ELECTRA-Small at T = 128 (E 128, H 256, I 1024, L 12; generator H 64, I 256): 70.2 MFLOPs per token;
ELECTRA-Base at T = 512 (E 768, H 768, I 3072, L 12; generator H 256, I 1024): 668 MFLOPs per token
(test_model_flops_of_the_presets checks both).
"""
from electra_ext.modules.config import ElectraConfig
from electra_ext.modules.pretraining import ElectraPretrainingConfig


def encoder_forward_flops_per_token(config: ElectraConfig, seq_len: int) -> int:
    E, H, I, L, T = (config.embedding_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                     seq_len)
    project = 2 * E * H if E != H else 0
    return project + L * (8 * H * H + 4 * H * I + 4 * T * H)


def training_flops_per_token(config: ElectraPretrainingConfig, seq_len: int) -> float:
    generator, discriminator = config.generator, config.discriminator
    masked_fraction = config.prediction_slots(seq_len) / seq_len
    generator_head = masked_fraction * (2 * generator.hidden_size * generator.embedding_size
                                        + 2 * generator.embedding_size * generator.vocab_size)
    discriminator_head = 2 * discriminator.hidden_size ** 2 + 2 * discriminator.hidden_size
    encoders = sum(encoder_forward_flops_per_token(part, seq_len) for part in (generator, discriminator))
    forward = encoders + generator_head + discriminator_head
    return 3 * forward

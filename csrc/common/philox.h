// Counter-based random numbers (Philox4x32-10, Salmon et al., SC'11) shared by the CPU kernels, the CUDA
// kernels and their SIMT emulation, so that every path draws the same bits for the same key. Torch-free.
//
// Attention dropout keys one byte per (batch, head, query row, key column) of a sequence, all positions counted
// inside that sequence (so the padded and the packed variable-length layouts drop the same entries):
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (column / 16, row, head, batch)     -> four words, 16 bytes; column c takes byte c % 16, i.e.
//             bits 8 (c % 4) .. 8 (c % 4) + 7 of word (c % 16) / 4.
// An entry is kept when its byte >= dropout_threshold(p) = round(256 p) (1 .. 255 for p in [1/512, 511/512));
// kept probabilities are scaled by 256 / (256 - threshold), the inverse of the exact keep probability, so the
// expectation is unbiased and the dropout rate is p rounded to a multiple of 1/256 (0.1 drops 26/256 = 10.16%).
// Why bytes, not 32-bit words: one Philox4x32-10 (~60 integer instructions on a GPU) per 16 entries instead of
// per 4, the draw FlashAttention and PyTorch's flash backend use; with 32-bit words the Philox math outweighed
// the matrix products of a tensor-core attention kernel ~2.5x (cuda/attention_forward_device.cuh).
//
// The generator head's Gumbel noise keys one word per (row, vocabulary column) of the logits, so a sample depends
// only on (seed, row, column), never on tiling or threads:
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (column / 4, row, 0xFFFFFFFF, 0x67656E68 "genh") -> four words; the column takes word column % 4.
// c2 = 0xFFFFFFFF is no attention head (heads < 2^16 in practice) and c3 no batch index, so for one seed the
// two streams never share a counter. uniform u = ((word >> 9) + 0.5) * 2^-23 and gumbel = -log(-log(u)), both
// in float32 (gen_head_uniform below says why 23 bits).
// electra_ext/ops/reference.py implements the same functions in PyTorch (the tests' oracle).
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace electra_ext::philox {

struct Words {
  uint32_t x[4];
};

ELECTRA_HOST_DEVICE void multiply_high_low(uint32_t a, uint32_t b, uint32_t& high, uint32_t& low) {
  const uint64_t product = uint64_t(a) * uint64_t(b);
  high = static_cast<uint32_t>(product >> 32);
  low = static_cast<uint32_t>(product);
}

// The Random123 constants (also used by the 8-lane CPU version in cpu/cpu_isa.h).
constexpr uint32_t kMultiplier0 = 0xD2511F53u, kMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
constexpr int kRounds = 10;

// Philox4x32 with 10 rounds.
ELECTRA_HOST_DEVICE Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                        uint32_t k1) {
  for (int round = 0; round < kRounds; ++round) {
    uint32_t high0, low0, high1, low1;
    multiply_high_low(kMultiplier0, c0, high0, low0);
    multiply_high_low(kMultiplier1, c2, high1, low1);
    const uint32_t n0 = high1 ^ c1 ^ k0, n2 = high0 ^ c3 ^ k1;
    c0 = n0;
    c1 = low1;
    c2 = n2;
    c3 = low0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Words{{c0, c1, c2, c3}};
}

// Attention dropout's byte threshold: round(256 p), p rounded to float32 first (as the Python reference does).
// 0 means no dropout; 256 (p >= 511/512) would drop everything, which the argument checks reject.
ELECTRA_HOST_DEVICE uint32_t dropout_threshold(float p) {
  return static_cast<uint32_t>(static_cast<double>(p) * 256.0 + 0.5);
}

// 256 / (256 - threshold): the scale of kept probabilities, the inverse of the keep probability.
ELECTRA_HOST_DEVICE float dropout_scale(uint32_t threshold) {
  return 256.0f / static_cast<float>(256 - threshold);
}

// Columns of one attention-dropout Philox call.
constexpr int kDropoutColumnsPerCall = 16;

// The four words (16 bytes) of attention-dropout columns 16 * column_chunk .. 16 * column_chunk + 15 of one row.
ELECTRA_HOST_DEVICE Words attention_dropout_words(uint64_t seed, uint32_t batch, uint32_t head, uint32_t row,
                                                  uint32_t column_chunk) {
  return philox4x32_10(column_chunk, row, head, batch, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// Keep bits of the 4 entries whose bytes `word` holds: bit j is (byte j >= threshold), threshold < 256. SWAR:
// per byte, the low 7 bits compare through the top bit of (x | 0x80) - (t & 0x7f) (no borrow between bytes), the
// top bits decide where they differ; a multiply gathers the 4 result bits (bits 7, 15, 23, 31 -> 21 .. 24, every
// partial product on its own bit, so no carries). ~10 integer instructions per 4 entries.
ELECTRA_HOST_DEVICE uint32_t dropout_keep_bits(uint32_t word, uint32_t threshold) {
  const uint32_t t = threshold * 0x01010101u, high = 0x80808080u;
  const uint32_t low_ge = (word | high) - (t & ~high);
  const uint32_t ge = ((word & ~t) | (~(word ^ t) & low_ge)) & high;
  return (((ge >> 7) * 0x00204081u) >> 21) & 0xFu;
}

// Keep bits of the 16 columns of one call: bit c for column 16 * column_chunk + c.
ELECTRA_HOST_DEVICE uint32_t dropout_keep_bits(const Words& words, uint32_t threshold) {
  return dropout_keep_bits(words.x[0], threshold) | dropout_keep_bits(words.x[1], threshold) << 4 |
         dropout_keep_bits(words.x[2], threshold) << 8 | dropout_keep_bits(words.x[3], threshold) << 12;
}

// Whether attention dropout keeps entry (batch, head, row, column).
ELECTRA_HOST_DEVICE bool attention_dropout_keep(uint64_t seed, uint32_t batch, uint32_t head, uint32_t row,
                                                uint32_t column, uint32_t threshold) {
  const Words words = attention_dropout_words(seed, batch, head, row, column / kDropoutColumnsPerCall);
  return ((words.x[column % 16 / 4] >> (8 * (column % 4))) & 0xFFu) >= threshold;
}

// The generator head's counter words c2 and c3 (see the top of this file).
constexpr uint32_t kGenHeadStream2 = 0xFFFFFFFFu, kGenHeadStream3 = 0x67656E68u;

// The four Gumbel-noise words of vocabulary columns 4 * column_group .. 4 * column_group + 3 of one row.
ELECTRA_HOST_DEVICE Words gen_head_gumbel_words(uint64_t seed, uint32_t row, uint32_t column_group) {
  return philox4x32_10(column_group, row, kGenHeadStream2, kGenHeadStream3, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// A word as a uniform number in (0, 1), exact in float32: (k + 0.5) * 2^-23 with k the word's top 23 bits,
// from 2^-24 to 1 - 2^-24. (word + 0.5) * 2^-32 would round to 1.0f for the top 128 words (float32 keeps 24
// bits), and -log(-log(1)) is +inf; 23 bits plus the half keep every value exact, so the CPU, the GPU and
// PyTorch get the same u. The Gumbel noise -log(-log(u)) then lies in [-2.81, 16.6].
ELECTRA_HOST_DEVICE float gen_head_uniform(uint32_t word) {
  return (static_cast<float>(word >> 9) + 0.5f) * 0x1p-23f;
}

}  // namespace electra_ext::philox

// The CPU attention kernels' bodies, included twice by attention_cpu.cpp: once as baseline x86-64 code
// (namespace portable) and once under `#pragma GCC target("avx2,fma")` (namespace avx2, with
// ELECTRA_EXT_CPU_AVX2_BODY defined), so that every loop here, lambdas included, is compiled for both and
// attention_cpu.cpp picks one at run time. Not a header to include anywhere else: it relies on the
// definitions that precede its inclusion in attention_cpu.cpp.

#if defined(ELECTRA_EXT_CPU_AVX2_BODY)

// e^x on 8 lanes: exp_vectorizable's Cephes polynomial with fused multiply-adds; 0 below -87, NaN stays NaN.
inline __m256 exp8(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.0f);
  const __m256 keep = _mm256_cmp_ps(x, lowest, _CMP_NLT_UQ);  // x >= -87, or NaN
  const __m256 clamped = _mm256_max_ps(lowest, x);           // the second operand when either is NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), clamped);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256 power_of_two = _mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23));
  return _mm256_and_ps(_mm256_mul_ps(p, power_of_two), keep);
}

// Lanes [0, n) of a vector, n in [1, 8).
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline float sum_of_lanes(__m256 v) {
  float lanes[8];
  _mm256_storeu_ps(lanes, v);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

inline float max_of(const float* x, int64_t n) {
  const __m256 minus_infinity = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m0 = minus_infinity, m1 = minus_infinity;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + j + 8));
  }
  for (; j + 8 <= n; j += 8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j));
  if (j < n) {
    const __m256i mask = first_lanes(n - j);
    const __m256 tail = _mm256_maskload_ps(x + j, mask);
    m1 = _mm256_max_ps(m1, _mm256_blendv_ps(minus_infinity, tail, _mm256_castsi256_ps(mask)));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_max_ps(m0, m1));
  return *std::max_element(lanes, lanes + 8);
}

// x[j] = e^(scale * x[j] - shift); returns the sum of the new x.
inline float exp_in_place(float* x, int64_t n, float scale, float shift) {
  const __m256 scale8 = _mm256_set1_ps(scale), shift8 = _mm256_set1_ps(shift);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 e0 = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(x + j), scale8, shift8));
    const __m256 e1 = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(x + j + 8), scale8, shift8));
    _mm256_storeu_ps(x + j, e0);
    _mm256_storeu_ps(x + j + 8, e1);
    sum0 = _mm256_add_ps(sum0, e0);
    sum1 = _mm256_add_ps(sum1, e1);
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(x + j), scale8, shift8));
    _mm256_storeu_ps(x + j, e);
    sum0 = _mm256_add_ps(sum0, e);
  }
  if (j < n) {
    const __m256i mask = first_lanes(n - j);
    const __m256 e = _mm256_and_ps(exp8(_mm256_fmsub_ps(_mm256_maskload_ps(x + j, mask), scale8, shift8)),
                                   _mm256_castsi256_ps(mask));
    _mm256_maskstore_ps(x + j, mask, e);
    sum1 = _mm256_add_ps(sum1, e);
  }
  return sum_of_lanes(_mm256_add_ps(sum0, sum1));
}

// Full vectors with plain loads and stores, the tail masked (masked stores are slow on some CPUs: measured,
// masking every vector took the backward's element-wise step from ~7 to ~23 ms, 1 thread).
template <bool kMasked>
inline __m256 load8(const float* x, __m256i mask) {
  if constexpr (kMasked) return _mm256_maskload_ps(x, mask);
  return _mm256_loadu_ps(x);
}

template <bool kMasked>
inline void store8(float* x, __m256i mask, __m256 v) {
  if constexpr (kMasked) {
    _mm256_maskstore_ps(x, mask, v);
  } else {
    _mm256_storeu_ps(x, v);
  }
}

template <bool kMasked>
inline void backward_step(float* probs, float* grad_probs, const float* multipliers, const float* lse,
                          const float* delta, __m256 scale8, __m256i mask) {
  const __m256 p = exp8(_mm256_fmsub_ps(load8<kMasked>(probs, mask), scale8, load8<kMasked>(lse, mask)));
  __m256 dp = load8<kMasked>(grad_probs, mask);
  __m256 dropped = p;
  if (multipliers != nullptr) {
    const __m256 m = load8<kMasked>(multipliers, mask);
    dp = _mm256_mul_ps(dp, m);
    dropped = _mm256_mul_ps(p, m);
  }
  const __m256 ds = _mm256_mul_ps(_mm256_mul_ps(scale8, p), _mm256_sub_ps(dp, load8<kMasked>(delta, mask)));
  store8<kMasked>(grad_probs, mask, ds);
  store8<kMasked>(probs, mask, dropped);
}

// One key column of a transposed backward tile, over query rows i in [0, n):
// p = e^(scale s - lse), dp = grad_probs * multipliers (dropout), grad_probs <- scale p (dp - delta),
// probs <- p * multipliers (the dropped probabilities; p without dropout).
inline void backward_column(float* probs, float* grad_probs, const float* multipliers, const float* lse,
                            const float* delta, int64_t n, float scale) {
  const __m256 scale8 = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    backward_step<false>(probs + i, grad_probs + i, multipliers ? multipliers + i : nullptr, lse + i, delta + i,
                         scale8, __m256i{});
  }
  if (i < n) {
    backward_step<true>(probs + i, grad_probs + i, multipliers ? multipliers + i : nullptr, lse + i, delta + i,
                        scale8, first_lanes(n - i));
  }
}

// 0xFF in each byte of `word` that dropout keeps (byte >= threshold as unsigned, max(byte, threshold) == byte),
// else 0.
inline __m256i kept_bytes(__m256i word, __m256i threshold) {
  return _mm256_cmpeq_epi8(_mm256_max_epu8(word, threshold), word);
}

// multipliers[j] = dropout_scale where dropout keeps (row, first_column + j) of (batch, head), else 0: the scalar
// dropout_multipliers' contract, 128 columns (8 Philox calls of 16 bytes) at a time. The 8 calls' keep bytes are
// put in column order by store_column_groups (its 4 x 8 transpose of 32-bit elements: element 4 g + w holds the 4
// bytes of columns 16 g + 4 w ..), then widened to float masks 8 columns at a time. With dropout 0.1 at B=4, T=512,
// H=12, D=64 (2 threads) the forward took 52 ms with scalar 32-bit words, 30 ms with 8-lane 32-bit words and
// 26.5 ms with 8-lane bytes (23.5 without dropout); forward + backward 140, 91 and 84-88 ms (79 without).
inline void dropout_multipliers(const AttentionInputs& in, int64_t batch, int64_t head, int64_t row,
                                int64_t first_column, int64_t columns, float* multipliers) {
  constexpr int64_t kPerCall = philox::kDropoutColumnsPerCall;
  const __m256i threshold = _mm256_set1_epi8(static_cast<char>(in.dropout_threshold));
  const __m256 scale = _mm256_set1_ps(in.dropout_scale);
  const auto seed_low = static_cast<uint32_t>(in.seed), seed_high = static_cast<uint32_t>(in.seed >> 32);
  for (int64_t column = 0; column < columns; column += 8 * kPerCall) {
    __m256i words[4];
    cpu_isa::column_group_counters(words, static_cast<uint32_t>((first_column + column) / kPerCall),
                                   static_cast<uint32_t>(row), static_cast<uint32_t>(head),
                                   static_cast<uint32_t>(batch));
    cpu_isa::philox4x32_10_lanes8(words, seed_low, seed_high);
    __m256 kept[4];
    for (int w = 0; w < 4; ++w) kept[w] = _mm256_castsi256_ps(kept_bytes(words[w], threshold));
    alignas(32) float ordered[32];  // 128 keep bytes in column order
    cpu_isa::store_column_groups(kept, ordered, 32);
    const auto* bytes = reinterpret_cast<const unsigned char*>(ordered);
    const int64_t count = std::min<int64_t>(8 * kPerCall, columns - column);
    for (int64_t j = 0; j < count; j += 8) {
      const __m256i mask = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + j)));
      const __m256 values = _mm256_and_ps(_mm256_castsi256_ps(mask), scale);
      if (count - j >= 8) {
        _mm256_storeu_ps(multipliers + column + j, values);
      } else {
        _mm256_maskstore_ps(multipliers + column + j, first_lanes(count - j), values);
      }
    }
  }
}

// transposed[j * ld + i] = the multiplier of (first_row + i, first_column + j), i < rows, j < columns: the
// backward's [key columns, query rows] tile. The 8 lanes take 8 consecutive rows of one 16-column call, so byte b
// of word w, shifted to the top of each lane and sign-extended, is 8 consecutive entries of column 4 w + b.
inline void transposed_dropout_multipliers(const AttentionInputs& in, int64_t batch, int64_t head,
                                           int64_t first_row, int64_t rows, int64_t first_column, int64_t columns,
                                           float* transposed, int64_t ld) {
  constexpr int64_t kPerCall = philox::kDropoutColumnsPerCall;
  const __m256i threshold = _mm256_set1_epi8(static_cast<char>(in.dropout_threshold));
  const __m256 scale = _mm256_set1_ps(in.dropout_scale);
  const auto seed_low = static_cast<uint32_t>(in.seed), seed_high = static_cast<uint32_t>(in.seed >> 32);
  for (int64_t row = 0; row < rows; row += 8) {
    const __m256i tail_rows = first_lanes(std::min<int64_t>(rows - row, 8));
    for (int64_t chunk = 0; kPerCall * chunk < columns; ++chunk) {
      __m256i words[4] = {
          _mm256_set1_epi32(static_cast<int>(first_column / kPerCall + chunk)),
          _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first_row + row)),
                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
          _mm256_set1_epi32(static_cast<int>(head)), _mm256_set1_epi32(static_cast<int>(batch))};
      cpu_isa::philox4x32_10_lanes8(words, seed_low, seed_high);
      for (__m256i& word : words) word = kept_bytes(word, threshold);
      for (int64_t column = kPerCall * chunk; column < std::min(kPerCall * (chunk + 1), columns); ++column) {
        const int byte = static_cast<int>(column % 4);
        const __m256i lanes = _mm256_srai_epi32(
            _mm256_sll_epi32(words[column % kPerCall / 4], _mm_cvtsi32_si128(24 - 8 * byte)), 24);
        const __m256 kept = _mm256_and_ps(_mm256_castsi256_ps(lanes), scale);
        float* out = transposed + column * ld + row;
        if (rows - row >= 8) {
          _mm256_storeu_ps(out, kept);
        } else {
          _mm256_maskstore_ps(out, tail_rows, kept);
        }
      }
    }
  }
}

// Eight consecutive float32 or bfloat16 values as float32 lanes (a bfloat16 is a float32's upper 16 bits).
template <typename scalar_t>
__m256 load_float8(const scalar_t* source) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(source);
  } else {
    static_assert(std::is_same_v<scalar_t, c10::BFloat16>);
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
}

// transposed[d, i] = rows[token + i, d] as float32, leading dimension ld: 8 x 8 blocks transposed in registers
// (float32 and bfloat16; float16 element by element).
template <typename scalar_t>
void transposed_float_rows(const HeadRows<scalar_t>& rows, int64_t token, int64_t count, int64_t head_dim,
                           float* transposed, int64_t ld) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
      int64_t d = 0;
      for (; d + 8 <= head_dim; d += 8) {
        __m256 r[8];
        for (int k = 0; k < 8; ++k) r[k] = load_float8(rows.row(token + i + k) + d);
        const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
        const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
        const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
        const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
        const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
        const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        float* out = transposed + d * ld + i;
        _mm256_storeu_ps(out + 0 * ld, _mm256_permute2f128_ps(u0, u4, 0x20));
        _mm256_storeu_ps(out + 1 * ld, _mm256_permute2f128_ps(u1, u5, 0x20));
        _mm256_storeu_ps(out + 2 * ld, _mm256_permute2f128_ps(u2, u6, 0x20));
        _mm256_storeu_ps(out + 3 * ld, _mm256_permute2f128_ps(u3, u7, 0x20));
        _mm256_storeu_ps(out + 4 * ld, _mm256_permute2f128_ps(u0, u4, 0x31));
        _mm256_storeu_ps(out + 5 * ld, _mm256_permute2f128_ps(u1, u5, 0x31));
        _mm256_storeu_ps(out + 6 * ld, _mm256_permute2f128_ps(u2, u6, 0x31));
        _mm256_storeu_ps(out + 7 * ld, _mm256_permute2f128_ps(u3, u7, 0x31));
      }
      for (; d < head_dim; ++d) {
        for (int64_t k = 0; k < 8; ++k) transposed[d * ld + i + k] = static_cast<float>(rows.row(token + i + k)[d]);
      }
    }
    transposed_float_rows_scalar(rows, token + i, count - i, head_dim, transposed + i, ld);
  } else {
    transposed_float_rows_scalar(rows, token, count, head_dim, transposed, ld);
  }
}

#else

inline float max_of(const float* x, int64_t n) {
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, -std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) lanes[lane] = std::max(lanes[lane], x[j + lane]);
  }
  for (; j < n; ++j) lanes[0] = std::max(lanes[0], x[j]);
  return *std::max_element(lanes, lanes + kLanes);
}

inline float exp_in_place(float* x, int64_t n, float scale, float shift) {
  for (int64_t j = 0; j < n; ++j) x[j] = exp_vectorizable(x[j] * scale - shift);
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) lanes[lane] += x[j + lane];
  }
  for (; j < n; ++j) lanes[0] += x[j];
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  return sum;
}

template <typename scalar_t>
void transposed_float_rows(const HeadRows<scalar_t>& rows, int64_t token, int64_t count, int64_t head_dim,
                           float* transposed, int64_t ld) {
  transposed_float_rows_scalar(rows, token, count, head_dim, transposed, ld);
}

inline void backward_column(float* probs, float* grad_probs, const float* multipliers, const float* lse,
                            const float* delta, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) probs[i] = exp_vectorizable(probs[i] * scale - lse[i]);
  if (multipliers != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      grad_probs[i] = scale * probs[i] * (grad_probs[i] * multipliers[i] - delta[i]);
      probs[i] *= multipliers[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) grad_probs[i] = scale * probs[i] * (grad_probs[i] - delta[i]);
  }
}

inline void transposed_dropout_multipliers(const AttentionInputs& in, int64_t batch, int64_t head,
                                           int64_t first_row, int64_t rows, int64_t first_column, int64_t columns,
                                           float* transposed, int64_t ld) {
  float row_multipliers[kBackwardKeyColumns];
  TORCH_INTERNAL_ASSERT(columns <= kBackwardKeyColumns);
  for (int64_t i = 0; i < rows; ++i) {
    dropout_multipliers(in, batch, head, first_row + i, first_column, columns, row_multipliers);
    for (int64_t j = 0; j < columns; ++j) transposed[j * ld + i] = row_multipliers[j];
  }
}

#endif

// Runs tasks [0, count) on every thread of the pool, each thread taking the next task as it finishes one, in the
// given order: `run(task, thread_state)` after `make_state()` once per thread. Which thread runs a task never
// changes its result; handing out tasks dynamically balances sequences of different lengths.
template <typename MakeState, typename Run>
void run_tasks(int64_t count, const MakeState& make_state, const Run& run) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count)), 1,
                   [&](int64_t, int64_t) {
                     auto state = make_state();
                     for (int64_t task = next.fetch_add(1); task < count; task = next.fetch_add(1)) run(task, state);
                   });
}

// Per task, the key blocks are the outer loop: each key block's K^T panel (and float32 V block, for bfloat16 and
// float16) is built once and used by every query block of the task, so no thread holds K^T of a whole sequence.
// The online softmax keeps each row's running maximum and sum across key blocks; its accumulator is the output
// itself for float32 (rescaled in place, divided by the sum at the end), a float32 buffer of the task's rows else.
template <typename scalar_t>
void attention_forward_kernel(const AttentionInputs& in, at::Tensor& out, at::Tensor& lse) {
  const int64_t tokens = in.q.size(0), heads = in.q.size(1), head_dim = in.q.size(2);
  const int64_t batches = in.batch;
  const int64_t query_blocks = blocks_of(in.max_seqlen, kForwardQueryRows);
  const int32_t* starts = in.starts.data_ptr<int32_t>();
  const int32_t* seqlens = in.seqlens.data_ptr<int32_t>();
  const float scale = static_cast<float>(in.softmax_scale);
  scalar_t* out_data = out.data_ptr<scalar_t>();
  float* lse_data = lse.data_ptr<float>();
  const int64_t out_token_stride = heads * head_dim;
  constexpr bool accumulate_in_output = std::is_same_v<scalar_t, float>;

  // A task is a run of query blocks of one (sequence, head): the whole sequence when there are enough (sequence,
  // head) pairs to keep every thread busy, so that each K^T panel is built once per pair; fewer blocks otherwise.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks_per_head =
      std::min(query_blocks, blocks_of(8 * threads, std::max<int64_t>(1, batches * heads)));
  // Other dtypes accumulate in a float32 buffer of the task's rows: at most kReducedTaskRows of them.
  const int64_t blocks_per_chunk =
      std::min(blocks_of(query_blocks, chunks_per_head),
               accumulate_in_output ? query_blocks : kReducedTaskRows / kForwardQueryRows);
  const int64_t task_rows = std::min(in.max_seqlen, blocks_per_chunk * kForwardQueryRows);
  struct Task {
    int64_t batch, head, first_block, end_block, cost;
  };
  std::vector<Task> tasks;
  for (int64_t b = 0; b < batches; ++b) {
    const int64_t seqlen = seqlens[b];
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t first = 0; first * kForwardQueryRows < seqlen; first += blocks_per_chunk) {
        const int64_t end = std::min(first + blocks_per_chunk, blocks_of(seqlen, kForwardQueryRows));
        const int64_t rows = std::min(end * kForwardQueryRows, seqlen) - first * kForwardQueryRows;
        tasks.push_back({b, h, first, end, rows * seqlen});
      }
    }
  }
  // Longest first, so that the last tasks handed out are the short ones.
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });

  struct Scratch {
    at::Tensor storage;
    float *key_transposed, *values, *q_buffer, *scores, *multipliers, *accumulator, *row_max, *row_sum;
  };
  const int64_t panel_size = head_dim * kForwardKeyColumns;
  const int64_t values_size = reads_in_place<scalar_t>(in.v.stride(0), head_dim) ? 0 : kForwardKeyColumns * head_dim;
  const int64_t q_size = reads_in_place<scalar_t>(in.q.stride(0), head_dim) ? 0 : kForwardQueryRows * head_dim;
  const int64_t scores_size = kForwardQueryRows * kForwardKeyColumns;
  const int64_t accumulator_size = accumulate_in_output ? 0 : task_rows * head_dim;
  auto make_scratch = [&] {
    // Per thread: one key block's K^T panel, the score tile, one row of dropout multipliers, the task rows' maxima
    // and sums; float32 copies of the V block and the q block only where they cannot be read in place, and the
    // accumulator only where the output is not float32.
    Scratch s;
    s.storage = at::empty({panel_size + values_size + q_size + scores_size + kForwardKeyColumns + accumulator_size +
                           2 * task_rows},
                          in.q.options().dtype(at::kFloat));
    s.key_transposed = s.storage.template data_ptr<float>();
    s.values = s.key_transposed + panel_size;
    s.q_buffer = s.values + values_size;
    s.scores = s.q_buffer + q_size;
    s.multipliers = s.scores + scores_size;
    s.accumulator = s.multipliers + kForwardKeyColumns;
    s.row_max = s.accumulator + accumulator_size;
    s.row_sum = s.row_max + task_rows;
    return s;
  };

  run_tasks(static_cast<int64_t>(tasks.size()), make_scratch, [&](int64_t task_index, Scratch& s) {
    const Task& task = tasks[task_index];
    const int64_t batch = task.batch, head = task.head;
    const int64_t seqlen = seqlens[batch], start = starts[batch];
    const int64_t first_task_row = task.first_block * kForwardQueryRows;
    const int64_t rows_in_task = std::min(task.end_block * kForwardQueryRows, seqlen) - first_task_row;
    const HeadRows<scalar_t> q_rows(in.q, head), k_rows(in.k, head), v_rows(in.v, head);
    float* accumulator = s.accumulator;
    int64_t accumulator_ld = head_dim;
    if constexpr (accumulate_in_output) {
      accumulator = out_data + (start + first_task_row) * out_token_stride + head * head_dim;
      accumulator_ld = out_token_stride;
    }
    std::fill(s.row_max, s.row_max + rows_in_task, -std::numeric_limits<float>::infinity());

    for (int64_t first_column = 0; first_column < seqlen; first_column += kForwardKeyColumns) {
      const int64_t columns = std::min(kForwardKeyColumns, seqlen - first_column);
      transposed_float_rows(k_rows, start + first_column, columns, head_dim, s.key_transposed, kForwardKeyColumns);
      int64_t v_ld = 0;
      const float* v_block = float_rows(v_rows, start + first_column, columns, head_dim, s.values, &v_ld);
      for (int64_t query_block = task.first_block; query_block < task.end_block; ++query_block) {
        const int64_t first_row = query_block * kForwardQueryRows;
        const int64_t rows = std::min(kForwardQueryRows, seqlen - first_row);
        int64_t q_ld = 0;
        const float* q_block = float_rows(q_rows, start + first_row, rows, head_dim, s.q_buffer, &q_ld);
        float* row_max = s.row_max + (first_row - first_task_row);
        float* row_sum = s.row_sum + (first_row - first_task_row);
        float* accumulator_block = accumulator + (first_row - first_task_row) * accumulator_ld;
        matmul(rows, columns, head_dim, q_block, q_ld, s.key_transposed, kForwardKeyColumns, s.scores,
               kForwardKeyColumns, false);
        for (int64_t i = 0; i < rows; ++i) {
          float* score_row = s.scores + i * kForwardKeyColumns;
          // scale > 0, so the maximum of the scaled scores is the scaled maximum, bit for bit.
          const float new_max = std::max(row_max[i], scale * max_of(score_row, columns));
          const float sum = exp_in_place(score_row, columns, scale, new_max);
          if (first_column == 0) {
            row_sum[i] = sum;
          } else {
            const float rescale = std::exp(row_max[i] - new_max);
            row_sum[i] = row_sum[i] * rescale + sum;
            if (rescale != 1.0f) {
              float* accumulator_row = accumulator_block + i * accumulator_ld;
              for (int64_t d = 0; d < head_dim; ++d) accumulator_row[d] *= rescale;
            }
          }
          row_max[i] = new_max;
          if (in.dropout_threshold > 0) {
            // The sum above is before dropout: lse and the normalisation are those of the undropped softmax.
            dropout_multipliers(in, batch, head, first_row + i, first_column, columns, s.multipliers);
            for (int64_t j = 0; j < columns; ++j) score_row[j] *= s.multipliers[j];
          }
        }
        matmul(rows, head_dim, columns, s.scores, kForwardKeyColumns, v_block, v_ld, accumulator_block,
               accumulator_ld, first_column > 0);
      }
    }

    for (int64_t i = 0; i < rows_in_task; ++i) {
      const int64_t token = start + first_task_row + i;
      store_rows(accumulator + i * accumulator_ld, 1, head_dim, 1.0f / s.row_sum[i],
                 out_data + token * out_token_stride + head * head_dim, out_token_stride);
      lse_data[head * tokens + token] = s.row_max[i] + std::log(s.row_sum[i]);
    }
  });
}

// Per task (one sequence and head) the query blocks are the outer loop, as in SDPA's CPU kernel: a thread holds
// one query block's Q^T, dO^T and dQ^T accumulator and one key block's K^T, rebuilt for every query block (and
// float32 copies of the q, dO, k and v blocks where they cannot be read in place). dK and dV accumulate over the
// query blocks in the float32 gradients themselves, or, for bfloat16 and float16, in float32 buffers of the
// sequence's rows. The tiles are transposed, [key columns, query rows]: S^T = K Q^T and dP^T = V dO^T, so that
// dV += (P o M)^T dO, dK += dS^T Q and dQ^T += K^T dS^T take every operand as stored and the element-wise step
// runs along query rows, where lse and delta are contiguous.
template <typename scalar_t>
void attention_backward_kernel(const AttentionInputs& in, const at::Tensor& grad_out, const at::Tensor& out,
                               const at::Tensor& lse, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  const int64_t tokens = in.q.size(0), heads = in.q.size(1), head_dim = in.q.size(2);
  const int64_t batches = in.batch;
  const int32_t* starts = in.starts.data_ptr<int32_t>();
  const int32_t* seqlens = in.seqlens.data_ptr<int32_t>();
  const float scale = static_cast<float>(in.softmax_scale);
  const float* lse_data = lse.data_ptr<float>();
  const int64_t grad_token_stride = grad_q.stride(0);  // grad_q, grad_k, grad_v: views of one [tokens, 3, H, D]
  const bool dropout = in.dropout_threshold > 0;
  constexpr bool accumulate_in_gradients = std::is_same_v<scalar_t, float>;

  // One task per (sequence, head), longest first.
  std::vector<int64_t> tasks;
  for (int64_t task = 0; task < batches * heads; ++task) {
    if (seqlens[task / heads] > 0) tasks.push_back(task);
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [&](int64_t a, int64_t b) { return seqlens[a / heads] > seqlens[b / heads]; });

  const int64_t query_panel = head_dim * kBackwardQueryRows, key_panel = head_dim * kBackwardKeyColumns;
  const int64_t tile_size = kBackwardKeyColumns * kBackwardQueryRows;
  const int64_t multipliers_size = dropout ? tile_size : 0;
  const int64_t q_size = reads_in_place<scalar_t>(in.q.stride(0), head_dim) ? 0 : query_panel;
  const int64_t grad_out_size = reads_in_place<scalar_t>(grad_out.stride(0), head_dim) ? 0 : query_panel;
  const int64_t k_size = reads_in_place<scalar_t>(in.k.stride(0), head_dim) ? 0 : key_panel;
  const int64_t v_size = reads_in_place<scalar_t>(in.v.stride(0), head_dim) ? 0 : key_panel;
  const int64_t accumulator_size = accumulate_in_gradients ? 0 : in.max_seqlen * head_dim;
  struct Scratch {
    at::Tensor storage;
    float *q_transposed, *grad_out_transposed, *grad_q_transposed, *key_transposed, *q_buffer, *grad_out_buffer,
        *k_buffer, *v_buffer, *delta, *probs, *grad_probs, *multipliers, *grad_k_accumulator, *grad_v_accumulator;
  };
  auto make_scratch = [&] {
    // Per thread: Q^T, dO^T and dQ^T as [head_dim, kBackwardQueryRows] panels, K^T as [head_dim,
    // kBackwardKeyColumns], delta, two transposed tiles (three with dropout); float32 copies of the q, dO, k and v
    // blocks only where they cannot be read in place, and the dK and dV accumulators of a whole sequence only
    // where the gradients are not float32. At T = 512, D = 64: 177 KB for float32 (SDPA's CPU flash kernel: two
    // 64 x 512 float32 tiles, 256 KB), 529 KB for bfloat16. The key-block-outer loop this replaced (2026-11-28)
    // held q, dO, Q^T, dO^T and dQ^T of a whole sequence: 0.84 MB, which put forward + backward 1.4 MiB above its
    // output and gradients with 2 threads (SDPA 0.4).
    Scratch s;
    s.storage = at::empty({3 * query_panel + key_panel + q_size + grad_out_size + k_size + v_size +
                           kBackwardQueryRows + 2 * tile_size + multipliers_size + 2 * accumulator_size},
                          in.q.options().dtype(at::kFloat));
    s.q_transposed = s.storage.template data_ptr<float>();
    s.grad_out_transposed = s.q_transposed + query_panel;
    s.grad_q_transposed = s.grad_out_transposed + query_panel;
    s.key_transposed = s.grad_q_transposed + query_panel;
    s.q_buffer = s.key_transposed + key_panel;
    s.grad_out_buffer = s.q_buffer + q_size;
    s.k_buffer = s.grad_out_buffer + grad_out_size;
    s.v_buffer = s.k_buffer + k_size;
    s.delta = s.v_buffer + v_size;
    s.probs = s.delta + kBackwardQueryRows;
    s.grad_probs = s.probs + tile_size;
    s.multipliers = s.grad_probs + tile_size;
    s.grad_k_accumulator = s.multipliers + multipliers_size;
    s.grad_v_accumulator = s.grad_k_accumulator + accumulator_size;
    return s;
  };

  run_tasks(static_cast<int64_t>(tasks.size()), make_scratch, [&](int64_t task_index, Scratch& s) {
    const int64_t head = tasks[task_index] % heads, batch = tasks[task_index] / heads;
    const int64_t seqlen = seqlens[batch], start = starts[batch];
    const HeadRows<scalar_t> q_rows(in.q, head), k_rows(in.k, head), v_rows(in.v, head);
    const HeadRows<scalar_t> grad_out_rows(grad_out, head), out_rows(out, head);
    const int64_t first_gradient = start * grad_token_stride + head * head_dim;
    float* grad_k_rows = s.grad_k_accumulator;
    float* grad_v_rows = s.grad_v_accumulator;
    int64_t grad_ld = head_dim;
    if constexpr (accumulate_in_gradients) {
      grad_k_rows = grad_k.data_ptr<float>() + first_gradient;
      grad_v_rows = grad_v.data_ptr<float>() + first_gradient;
      grad_ld = grad_token_stride;
    }
    const float* lse_row = lse_data + head * tokens + start;

    for (int64_t first_row = 0; first_row < seqlen; first_row += kBackwardQueryRows) {
      const int64_t rows = std::min(kBackwardQueryRows, seqlen - first_row);
      int64_t q_ld = 0, grad_out_ld = 0;
      const float* q_block = float_rows(q_rows, start + first_row, rows, head_dim, s.q_buffer, &q_ld);
      const float* grad_out_block =
          float_rows(grad_out_rows, start + first_row, rows, head_dim, s.grad_out_buffer, &grad_out_ld);
      transposed_float_rows(q_rows, start + first_row, rows, head_dim, s.q_transposed, kBackwardQueryRows);
      transposed_float_rows(grad_out_rows, start + first_row, rows, head_dim, s.grad_out_transposed,
                            kBackwardQueryRows);
      // delta = rowsum(dO o O), what the softmax backward subtracts from dP.
      for (int64_t i = 0; i < rows; ++i) {
        const scalar_t* o = out_rows.row(start + first_row + i);
        const float* g = grad_out_block + i * grad_out_ld;
        float lanes[kLanes] = {};
        int64_t d = 0;
        for (; d + kLanes <= head_dim; d += kLanes) {
          for (int64_t lane = 0; lane < kLanes; ++lane) lanes[lane] += g[d + lane] * static_cast<float>(o[d + lane]);
        }
        for (; d < head_dim; ++d) lanes[0] += g[d] * static_cast<float>(o[d]);
        float sum = 0.0f;
        for (float lane : lanes) sum += lane;
        s.delta[i] = sum;
      }

      for (int64_t first_column = 0; first_column < seqlen; first_column += kBackwardKeyColumns) {
        const int64_t columns = std::min(kBackwardKeyColumns, seqlen - first_column);
        transposed_float_rows(k_rows, start + first_column, columns, head_dim, s.key_transposed,
                              kBackwardKeyColumns);
        int64_t k_ld = 0, v_ld = 0;
        const float* k_block = float_rows(k_rows, start + first_column, columns, head_dim, s.k_buffer, &k_ld);
        const float* v_block = float_rows(v_rows, start + first_column, columns, head_dim, s.v_buffer, &v_ld);
        // S^T = K Q^T and dP^T = V dO^T, [columns, rows] with leading dimension kBackwardQueryRows.
        matmul(columns, rows, head_dim, k_block, k_ld, s.q_transposed, kBackwardQueryRows, s.probs,
               kBackwardQueryRows, false);
        matmul(columns, rows, head_dim, v_block, v_ld, s.grad_out_transposed, kBackwardQueryRows, s.grad_probs,
               kBackwardQueryRows, false);
        if (dropout) {
          transposed_dropout_multipliers(in, batch, head, first_row, rows, first_column, columns, s.multipliers,
                                         kBackwardQueryRows);
        }
        for (int64_t j = 0; j < columns; ++j) {
          // probs <- P o M, grad_probs <- dS (softmax_scale folded in for dQ and dK).
          backward_column(s.probs + j * kBackwardQueryRows, s.grad_probs + j * kBackwardQueryRows,
                          dropout ? s.multipliers + j * kBackwardQueryRows : nullptr, lse_row + first_row, s.delta,
                          rows, scale);
        }
        const bool first_query_block = first_row == 0;
        matmul(columns, head_dim, rows, s.probs, kBackwardQueryRows, grad_out_block, grad_out_ld,
               grad_v_rows + first_column * grad_ld, grad_ld, !first_query_block);
        matmul(columns, head_dim, rows, s.grad_probs, kBackwardQueryRows, q_block, q_ld,
               grad_k_rows + first_column * grad_ld, grad_ld, !first_query_block);
        matmul(head_dim, rows, columns, s.key_transposed, kBackwardKeyColumns, s.grad_probs, kBackwardQueryRows,
               s.grad_q_transposed, kBackwardQueryRows, first_column > 0);
      }
      scalar_t* grad_q_block = grad_q.data_ptr<scalar_t>() + first_gradient + first_row * grad_token_stride;
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t d = 0; d < head_dim; ++d) {
          grad_q_block[i * grad_token_stride + d] =
              static_cast<scalar_t>(s.grad_q_transposed[d * kBackwardQueryRows + i]);
        }
      }
    }
    if constexpr (!accumulate_in_gradients) {
      store_rows(grad_k_rows, seqlen, head_dim, 1.0f, grad_k.data_ptr<scalar_t>() + first_gradient,
                 grad_token_stride);
      store_rows(grad_v_rows, seqlen, head_dim, 1.0f, grad_v.data_ptr<scalar_t>() + first_gradient,
                 grad_token_stride);
    }
  });
}

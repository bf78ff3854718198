// ate_fast: attention's softmax and its backward over score rows on the CPU, one pass per
// row (ATen: a scaling product, softmax, then a product, a row sum, a difference and two
// products for the gradient) — the flow transformer's input-VJP through attention
// (models/flow_transformer_vjp.py).
//
//   softmax_backward, with scores:  p[r, :] = softmax(scores[r, :]·scale)
//                                   ds[r, :] = p ⊙ (dp − Σ dp ⊙ p)·scale
//   without scores (p the forward's probabilities, read): ds only.
//
// A score of −inf (a masked key) gets probability exactly 0. Rows are one stride apart
// (each tensor its own stride: 16-byte-aligned rows of a padded buffer) with unit column
// stride. float32 or bfloat16 (every row of a call in one dtype; bf16 computed in float32,
// each output rounded once). Torch-free, like every launcher here.
#pragma once

#include <cstdint>

#include "ate_fast/constants.h"  // DType

namespace ate_fast {

struct SoftmaxBackwardArgs {
  int64_t rows = 0;  // B·kv_heads·query rows
  int64_t n = 0;     // keys
  const void* scores = nullptr;  // [rows, n] or null: p is the input
  int64_t scores_row_stride = 0;
  void* p = nullptr;  // [rows, n]: written from scores, else read
  int64_t p_row_stride = 0;
  const void* dp = nullptr;  // [rows, n]
  int64_t dp_row_stride = 0;
  void* ds = nullptr;  // [rows, n]
  int64_t ds_row_stride = 0;
  double scale = 1.0;
  int threads = 1;  // OpenMP threads for a large call (the caller's torch setting)
};

}  // namespace ate_fast

// Row codecs for the compact FFN copies (sparsity.cpp): dequantize a weight row of the file's
// type, and quantize a gathered row back into it.
//
// ggml's own row (de)quantizers for Q4_0 are scalar reference code, and the compact down matrix
// of every sparse layer passes through both once per answer, on the critical path between the
// prompt and the answer's second token. Here Q4_0 and Q8_0 have AVX2 kernels (chosen at run time:
// the wheel is built for baseline x86-64); every other type and CPU uses ggml's functions.
#pragma once

#include <cstdint>

#include "ggml.h"

namespace cmx {

// dst[0..n) = the n values of a row of `type` (n a multiple of its block size).
void dequantize_row(ggml_type type, const void *src, float *dst, int64_t n);

// A row of `type` from n floats. Q4_0 writes exactly the bytes ggml's reference quantizer writes.
void quantize_row(ggml_type type, const float *src, void *dst, int64_t n);

}  // namespace cmx

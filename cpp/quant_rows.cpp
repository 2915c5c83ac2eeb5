#include "quant_rows.h"

#include <cmath>
#include <cstring>

#include "ggml-cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CMX_X86_KERNELS 1
#include <immintrin.h>
#endif

namespace cmx {
namespace {

// ggml's block layouts (ggml-common.h): an f16 scale, then the quants of 32 values.
constexpr int kBlock = 32;
struct BlockQ4_0 {
    uint16_t d;
    uint8_t qs[kBlock / 2];  // value j in the low nibble of byte j, value j + 16 in its high nibble
};
struct BlockQ8_0 {
    uint16_t d;
    int8_t qs[kBlock];
};
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ8_0) == 34, "ggml block layouts");

#ifdef CMX_X86_KERNELS
bool has_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    return yes;
}

__attribute__((target("avx2,f16c"))) float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

__attribute__((target("avx2,f16c"))) void dequantize_q4_0_avx2(const BlockQ4_0 *x, float *y, int64_t nb) {
    const __m128i low4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    for (int64_t b = 0; b < nb; ++b, y += kBlock) {
        const __m256 d = _mm256_set1_ps(half_to_float(x[b].d));
        const __m128i q = _mm_loadu_si128((const __m128i *)x[b].qs);
        const __m128i lo = _mm_sub_epi8(_mm_and_si128(q, low4), eight);                     // values 0..15
        const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), low4), eight);  // values 16..31
        // (q - 8) as float times d: what ggml's dequantize_row_q4_0 computes, value for value
        _mm256_storeu_ps(y + 0, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), d));
        _mm256_storeu_ps(y + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), d));
        _mm256_storeu_ps(y + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), d));
        _mm256_storeu_ps(y + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), d));
    }
}

__attribute__((target("avx2,f16c"))) void dequantize_q8_0_avx2(const BlockQ8_0 *x, float *y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, y += kBlock) {
        const __m256 d = _mm256_set1_ps(half_to_float(x[b].d));
        for (int j = 0; j < kBlock; j += 8) {
            const __m128i q = _mm_loadl_epi64((const __m128i *)(x[b].qs + j));
            _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d));
        }
    }
}

// ggml's quantize_row_q4_0_ref, vectorized with the same float operations in the same order
// (no fused multiply-add), so that it writes the same bytes:
//   max = the first value of largest magnitude; d = max / -8; id = 1/d (0 if d == 0);
//   q = min(15, (int)(x * id + 8.5)), value j in the low nibble and j + 16 in the high one.
__attribute__((target("avx2,f16c"))) void quantize_q4_0_avx2(const float *x, BlockQ4_0 *y, int64_t nb) {
    const __m256 sign = _mm256_set1_ps(-0.0f), half8 = _mm256_set1_ps(8.5f);
    const __m256i fifteen = _mm256_set1_epi32(15);
    for (int64_t b = 0; b < nb; ++b, x += kBlock) {
        __m256 v[4], a[4];
        for (int i = 0; i < 4; ++i) {
            v[i] = _mm256_loadu_ps(x + 8 * i);
            a[i] = _mm256_andnot_ps(sign, v[i]);
        }
        __m256 m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        const float amax = _mm_cvtss_f32(m4);
        float max = 0.0f;
        if (amax > 0.0f) {  // the first value whose magnitude is amax, with its sign
            const __m256 am = _mm256_set1_ps(amax);
            for (int i = 0; i < 4; ++i) {
                const int hit = _mm256_movemask_ps(_mm256_cmp_ps(a[i], am, _CMP_EQ_OQ));
                if (hit) {
                    max = x[8 * i + __builtin_ctz(hit)];
                    break;
                }
            }
        }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);  // = ggml_fp32_to_fp16(d): round to nearest even
        const __m256 idv = _mm256_set1_ps(id);
        __m256i q[4];
        for (int i = 0; i < 4; ++i)  // truncation toward zero, as the reference's (int8_t) cast
            q[i] = _mm256_min_epi32(fifteen, _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v[i], idv), half8)));
        // values 0..15 -> low nibbles, 16..31 -> high nibbles
        const __m256i lo16 = _mm256_packus_epi32(q[0], q[1]);  // 0-3 8-11 | 4-7 12-15 (16-bit)
        const __m256i hi16 = _mm256_packus_epi32(q[2], q[3]);
        const __m256i lo = _mm256_permute4x64_epi64(lo16, 0xD8);  // 0..15 in order
        const __m256i hi = _mm256_permute4x64_epi64(hi16, 0xD8);
        const __m256i bytes = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));  // 16 values in 16-bit lanes
        const __m128i packed = _mm_packus_epi16(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1));
        _mm_storeu_si128((__m128i *)y[b].qs, packed);
    }
}
#endif

}  // namespace

void dequantize_row(ggml_type type, const void *src, float *dst, int64_t n) {
#ifdef CMX_X86_KERNELS
    if (has_avx2() && n % kBlock == 0) {
        if (type == GGML_TYPE_Q4_0) return dequantize_q4_0_avx2((const BlockQ4_0 *)src, dst, n / kBlock);
        if (type == GGML_TYPE_Q8_0) return dequantize_q8_0_avx2((const BlockQ8_0 *)src, dst, n / kBlock);
    }
#endif
    if (type == GGML_TYPE_F32) {
        std::memcpy(dst, src, n * sizeof(float));
        return;
    }
    ggml_get_type_traits(type)->to_float(src, dst, n);
}

void quantize_row(ggml_type type, const float *src, void *dst, int64_t n) {
#ifdef CMX_X86_KERNELS
    if (type == GGML_TYPE_Q4_0 && has_avx2() && n % kBlock == 0) return quantize_q4_0_avx2(src, (BlockQ4_0 *)dst, n / kBlock);
#endif
    if (type == GGML_TYPE_F32) {
        std::memcpy(dst, src, n * sizeof(float));
        return;
    }
    // the CPU backend's row quantizer where it has one (vectorized for Q8_0), else ggml's reference
    const auto *cpu = ggml_get_type_traits_cpu(type);
    if (cpu && cpu->from_float) cpu->from_float(src, dst, n);
    else ggml_quantize_chunk(type, src, dst, 0, 1, n, nullptr);
}

}  // namespace cmx

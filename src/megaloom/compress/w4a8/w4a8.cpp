// int4 weights x int8 activations on x86 CPUs with AVX-512 VNNI (megaloom quantize --bits 4).
//
// Weights: unsigned 4-bit values u = q + 8 in [0, 15] with one float scale per group of
// `group` inputs (a multiple of 128). Each 128-input block of a row is 64 bytes: byte j holds
// input j in its low nibble and input 64 + j in its high nibble, so one 64-byte load unpacks
// (two ANDs, one shift) into the two 64-lane operands of VPDPBUSD. Activations: each row
// quantised symmetrically to int8 from its own range on every call (as fbgemm's dynamic
// int8 linear does). The offset of the unsigned weights is removed per group with the
// activations' group sums: sum(u * x) - 8 * sum(x) = sum(q * x).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 128;  // inputs per 64-byte weight load
constexpr int kRowTile = 4;      // activation rows that share each unpacked weight block

struct Activations {
  std::vector<int8_t> values;       // rows x k
  std::vector<float> scales;        // one per row
  std::vector<float> offsets;       // rows x (k / group): -8 x the sum of each group's values
};

Activations quantize_rows(const float* x, int64_t rows, int64_t k, int64_t group) {
  const int64_t groups = k / group;
  Activations a{std::vector<int8_t>(rows * k), std::vector<float>(rows),
                std::vector<float>(rows * groups)};
  for (int64_t m = 0; m < rows; ++m) {
    const float* row = x + m * k;
    float amax = 0.f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(row[i]));
    const float scale = amax > 0.f ? amax / 127.f : 1.f, inverse = 1.f / scale;
    a.scales[m] = scale;
    int8_t* out = a.values.data() + m * k;
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t i = g * group; i < (g + 1) * group; ++i) {
        const auto v = static_cast<int32_t>(std::nearbyint(row[i] * inverse));
        out[i] = static_cast<int8_t>(v);
        sum += v;
      }
      a.offsets[m * groups + g] = static_cast<float>(-8 * sum);
    }
  }
  return a;
}

// y[m0 .. m0 + M, n0 .. n1] from the packed weights and the quantised activations.
template <int M>
void output_tile(const Activations& a, int64_t m0, const uint8_t* weights, const float* scales,
                 float* y, int64_t n0, int64_t n1, int64_t k, int64_t n_out, int64_t group) {
  const int64_t groups = k / group, blocks = group / kBlock;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const int8_t* x = a.values.data() + m0 * k;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = weights + n * (k / 2);
    const float* row_scales = scales + n * groups;
    __m512 total[M];
    for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512i dot[M];
      for (int m = 0; m < M; ++m) dot[m] = _mm512_setzero_si512();
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t col = (g * blocks + b) * kBlock;
        const __m512i bytes = _mm512_loadu_si512(row + col / 2);
        const __m512i low = _mm512_and_si512(bytes, nibble);
        const __m512i high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
        for (int m = 0; m < M; ++m) {
          const int8_t* xm = x + m * k + col;
          dot[m] = _mm512_dpbusd_epi32(dot[m], low, _mm512_loadu_si512(xm));
          dot[m] = _mm512_dpbusd_epi32(dot[m], high, _mm512_loadu_si512(xm + 64));
        }
      }
      const __m512 scale = _mm512_set1_ps(row_scales[g]);
      for (int m = 0; m < M; ++m)
        total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m]), scale, total[m]);
    }
    // the unsigned weights' offset, 16 groups per vector: scale x (-8 x the group's x sum)
    for (int64_t g0 = 0; g0 < groups; g0 += 16) {
      const __mmask16 lanes = groups - g0 >= 16 ? 0xFFFF : (1u << (groups - g0)) - 1;
      const __m512 group_scales = _mm512_maskz_loadu_ps(lanes, row_scales + g0);
      for (int m = 0; m < M; ++m)
        total[m] = _mm512_fmadd_ps(
            group_scales, _mm512_maskz_loadu_ps(lanes, &a.offsets[(m0 + m) * groups + g0]),
            total[m]);
    }
    for (int m = 0; m < M; ++m)
      y[(m0 + m) * n_out + n] = a.scales[m0 + m] * _mm512_reduce_add_ps(total[m]);
  }
}

}  // namespace

// x (rows, k) float32, packed (n, k / 2) uint8 in the block layout above, scales (n, k / group)
// float32 -> (rows, n) float32.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed,
                     const torch::Tensor& scales, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 matrix");
  TORCH_CHECK(packed.scalar_type() == torch::kByte && packed.is_contiguous(),
              "packed weights must be contiguous uint8");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous(),
              "scales must be contiguous float32");
  const int64_t rows = x.size(0), k = x.size(1), n_out = packed.size(0);
  TORCH_CHECK(group % kBlock == 0 && k % group == 0, "group must be a multiple of 128 dividing ",
              "the input width");
  TORCH_CHECK(packed.size(1) * 2 == k && scales.size(0) == n_out && scales.size(1) == k / group,
              "weight, scale and input shapes disagree");
  const Activations a = quantize_rows(x.data_ptr<float>(), rows, k, group);
  auto out = torch::empty({rows, n_out}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  float* y = out.data_ptr<float>();
  at::parallel_for(0, n_out, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < rows; m0 += kRowTile) {
      switch (std::min<int64_t>(kRowTile, rows - m0)) {
        case 1: output_tile<1>(a, m0, w, s, y, n0, n1, k, n_out, group); break;
        case 2: output_tile<2>(a, m0, w, s, y, n0, n1, k, n_out, group); break;
        case 3: output_tile<3>(a, m0, w, s, y, n0, n1, k, n_out, group); break;
        default: output_tile<4>(a, m0, w, s, y, n0, n1, k, n_out, group);
      }
    }
  });
  return out;
}

// The float weights (n, k) in bf16, for prompts long enough that a bf16 GEMM on them beats
// the int8 dot products (the caller decides and logs it).
torch::Tensor dequantize_bf16(const torch::Tensor& packed, const torch::Tensor& scales,
                              int64_t group) {
  TORCH_CHECK(packed.scalar_type() == torch::kByte && packed.is_contiguous() &&
              scales.scalar_type() == torch::kFloat && scales.is_contiguous(),
              "packed weights must be contiguous uint8 and scales contiguous float32");
  const int64_t n_out = packed.size(0), k = packed.size(1) * 2, groups = k / group;
  TORCH_CHECK(group % kBlock == 0 && scales.size(0) == n_out && scales.size(1) == groups,
              "weight and scale shapes disagree");
  auto out = torch::empty({n_out, k}, packed.options().dtype(torch::kBFloat16));
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  at::BFloat16* y = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, n_out, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t col = 0; col < k; col += kBlock) {
        const float scale = s[n * groups + col / group];
        const uint8_t* bytes = w + n * (k / 2) + col / 2;
        at::BFloat16* row = y + n * k + col;
        for (int64_t j = 0; j < kBlock / 2; ++j) {
          row[j] = static_cast<float>((bytes[j] & 15) - 8) * scale;
          row[j + kBlock / 2] = static_cast<float>((bytes[j] >> 4) - 8) * scale;
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("linear", &linear, "int4 x int8 linear (AVX-512 VNNI)");
  module.def("dequantize_bf16", &dequantize_bf16, "int4 weights to bf16");
}

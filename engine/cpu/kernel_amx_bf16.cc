// The bf16 kernel on AMX tiles (Intel Sapphire Rapids and later: AMX-TILE and AMX-BF16): the
// score and value products as tdpbf16ps on 16-row tiles, the panel loop, masking and online softmax
// those of every other path (kernel_body.inc, on AVX-512 vectors).
//
// The operands are the bf16 kernel's (bf16_pack_avx512.inc), whose pair layouts are exactly what
// tdpbf16ps reads: C[M][N] += A[M][K] B[K][N] with A as M rows of K bf16 (pairs along K), B as K/2
// rows of N bf16 pairs. One tile configuration serves both products:
//
//   tile 0-3  C: 16 rows x 16 fp32 (64 bytes): scores of 16 keys each, or outputs of 16 head dims
//   tile 4    A: 16 rows x 32 bf16: a panel's q over 32 head dims, or its weights over 32 keys
//   tile 5, 6 B: 16 pair rows x 16 pairs: kt over 16 d-pairs x 16 keys, or v over 16 key pairs x
//             16 head dims (two registers, so that a load need not wait for the product before)
//   tile 7    A, 16 rows x 16 bf16 and tile 6 as B of 8 pair rows: the last 16 head dims of the
//             scores when dim_pad is an odd multiple of 16 (D = 16, 48, 80, 112); tile 6 is then
//             the only B register for the last dims, and tile 5 serves the rest
//
// A panel is 16 query rows: a full tile, so each B tile loaded (1 KiB) serves 16 rows' products
// (with 8-row panels the B loads took as long as the products). Rows past the packed q's padding
// are the zero rows bf16_pack_avx512.inc adds; RunPanels writes no row past row_end. The output's
// correction is applied in memory (o *= corr, on AVX-512) before the block's P V accumulates onto
// it in the C tiles. Compiled with -mavx512f -mavx512bf16 -mamx-tile -mamx-bf16 -mfma
// (engine/CMakeLists.txt). Run it only where HasAmxBf16() (the CPU has the features and the OS
// granted the tile state, attention_kernel.cc).
#include <immintrin.h>

#include <cstdint>

#include "engine/cpu/attention_kernel.h"

namespace da::engine::cpu::amx_bf16 {
namespace {

// The softmax's exp2 to degree 4 (relative error below 1e-4): the weights are rounded to bf16
// (half an ulp: 2e-3) before the value product, and the degree-7 polynomial cost 8% of this
// kernel's speed for no change in its error (da-bench: relative L2 2.37e-3 either way).
constexpr int kExp2Degree = 4;
#include "engine/cpu/vec_avx512.inc"

constexpr int kRows = 16;  // A panel: one tile's rows (q holds zero rows up to a multiple).
constexpr int kCols = 2;   // Unused here: the fp32 tiles of kernel_body.inc need a shape.

#include "engine/cpu/bf16_pack_avx512.inc"
#include "engine/cpu/kernel_body.inc"

static_assert(kRows == kMaxPanelRows, "q's bf16 copy is padded to whole panels");

// The LDTILECFG operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads the configuration above; `half_dims`: dim_pad is an odd multiple of 16, so tile 6 holds
// 8 pair rows (the last 16 dims' kt) and tile 7 the A of those dims.
void ConfigureTiles(bool half_dims) {
  TileConfig c;
  for (int t = 0; t < 4; ++t) {
    c.rows[t] = kRows;
    c.colsb[t] = 64;
  }
  c.rows[4] = kRows;
  c.colsb[4] = 64;
  c.rows[5] = 16;
  c.colsb[5] = 64;
  c.rows[6] = half_dims ? 8 : 16;
  c.colsb[6] = 64;
  c.rows[7] = kRows;
  c.colsb[7] = 32;
  _tile_loadconfig(&c);
}

// The four C tiles' products with A in tile 4 and B from `b` (column blocks of 16 pairs, rows
// `stride` bytes apart), alternating B between tiles 5 and 6; `count` of the four (1 to 4).
#define DA_AMX_PRODUCT(j, btile)            \
  do {                                      \
    _tile_loadd(btile, b + (j)*16, stride); \
    _tile_dpbf16ps(j, 4, btile);            \
  } while (0)

inline void FourProducts(const uint32_t* b, int64_t stride, int count) {
  DA_AMX_PRODUCT(0, 5);
  if (count > 1) DA_AMX_PRODUCT(1, 6);
  if (count > 2) DA_AMX_PRODUCT(2, 5);
  if (count > 3) DA_AMX_PRODUCT(3, 6);
}

// The same with tile 5 only (tile 6 is the last dims' B). Not one template over the second tile:
// GCC's AMX intrinsics are macros that paste the tile number into the instruction's text, so it
// must be a literal.
inline void FourProductsOneB(const uint32_t* b, int64_t stride, int count) {
  DA_AMX_PRODUCT(0, 5);
  if (count > 1) DA_AMX_PRODUCT(1, 5);
  if (count > 2) DA_AMX_PRODUCT(2, 5);
  if (count > 3) DA_AMX_PRODUCT(3, 5);
}
#undef DA_AMX_PRODUCT

struct AmxTiles {
  static constexpr int kPanelRows = kRows;
  const SegmentKernelArgs& a;
  Bf16Operands ops;
  bool half_dims;

  // s[r][0, kb) = q[r0 + r] . kt[:, k0 + c] in fp32 from bf16 pairs.
  void Score(int64_t r0, int64_t k0, int64_t kb, float* s) const {
    const int64_t pairs = a.dim_pad / 2;
    const int64_t full = pairs / 16;  // Blocks of 32 head dims.
    const uint32_t* qp = ops.q + (r0 - a.row_begin) * pairs;
    const int64_t kt_stride = a.keys_pad * 4;
    for (int64_t c0 = 0; c0 < kb; c0 += 64) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t t = 0; t < full; ++t) {
        _tile_loadd(4, qp + t * 16, pairs * 4);
        const uint32_t* b = ops.kt + t * 16 * a.keys_pad + k0 + c0;
        if (half_dims) {
          FourProductsOneB(b, kt_stride, 4);
        } else {
          FourProducts(b, kt_stride, 4);
        }
      }
      if (half_dims) {
        _tile_loadd(7, qp + full * 16, pairs * 4);
        const uint32_t* b = ops.kt + full * 16 * a.keys_pad + k0 + c0;
        _tile_loadd(6, b, kt_stride);
        _tile_dpbf16ps(0, 7, 6);
        _tile_loadd(6, b + 16, kt_stride);
        _tile_dpbf16ps(1, 7, 6);
        _tile_loadd(6, b + 32, kt_stride);
        _tile_dpbf16ps(2, 7, 6);
        _tile_loadd(6, b + 48, kt_stride);
        _tile_dpbf16ps(3, 7, 6);
      }
      _tile_stored(0, s + c0, kKeyBlock * 4);
      _tile_stored(1, s + c0 + 16, kKeyBlock * 4);
      _tile_stored(2, s + c0 + 32, kKeyBlock * 4);
      _tile_stored(3, s + c0 + 48, kKeyBlock * 4);
    }
  }

  // o[r] = o[r] * corr[r] + sum_c p[r][c] v[k0 + c], p the bf16 rounding of weights.
  void Value(const float* weights, int64_t k0, int64_t kb, const float* corr, float* o) const {
    const int64_t dim_pad = a.dim_pad;
    constexpr int64_t kPRow = kKeyBlock / 2;  // p's row length in pairs.
    for (int r = 0; r < kRows; ++r) {
      ToBf16(weights + r * kKeyBlock, kb, reinterpret_cast<uint16_t*>(ops.p + r * kPRow));
      const Vec c = Vec::Set1(corr[r]);
      for (int64_t d = 0; d < dim_pad; d += 16) {
        Vec::Store(o + r * dim_pad + d, Vec::Mul(Vec::Load(o + r * dim_pad + d), c));
      }
    }
    const int64_t o_stride = dim_pad * 4;
    const int64_t v_stride = dim_pad * 4;
    for (int64_t d0 = 0; d0 < dim_pad; d0 += 64) {
      const int count = (dim_pad - d0) / 16 < 4 ? static_cast<int>((dim_pad - d0) / 16) : 4;
      _tile_loadd(0, o + d0, o_stride);
      if (count > 1) _tile_loadd(1, o + d0 + 16, o_stride);
      if (count > 2) _tile_loadd(2, o + d0 + 32, o_stride);
      if (count > 3) _tile_loadd(3, o + d0 + 48, o_stride);
      for (int64_t kc = 0; kc < kb / 32; ++kc) {
        _tile_loadd(4, ops.p + kc * 16, kPRow * 4);
        const uint32_t* b = ops.v + (k0 / 2 + kc * 16) * dim_pad + d0;
        if (half_dims) {
          FourProductsOneB(b, v_stride, count);
        } else {
          FourProducts(b, v_stride, count);
        }
      }
      _tile_stored(0, o + d0, o_stride);
      if (count > 1) _tile_stored(1, o + d0 + 16, o_stride);
      if (count > 2) _tile_stored(2, o + d0 + 32, o_stride);
      if (count > 3) _tile_stored(3, o + d0 + 48, o_stride);
    }
  }
};

}  // namespace

void RunSegment(const SegmentKernelArgs& a) {
  const bool half_dims = a.dim_pad % 32 != 0;
  ConfigureTiles(half_dims);
  const Bf16Operands ops = PackBf16Operands(a);
  RunPanels(a, AmxTiles{a, ops, half_dims}, a.row_begin, a.row_end);
  _tile_release();
}

}  // namespace da::engine::cpu::amx_bf16

// The AMX bf16 throughput loop for the peak measurement (tdpbf16ps on full 16 x 16 x 32 tiles,
// four independent accumulator tiles), compiled with AMX flags; called only where
// engine::cpu::HasAmxBf16() (which also asks the OS for the tile state). Tile configuration is
// per thread: each call loads it and releases the tiles at the end.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace da::bench {

float Bf16TileLoopAmx(int64_t iterations) {
  struct alignas(64) {
    uint8_t palette_id = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int t = 0; t < 6; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  alignas(64) uint16_t a[16 * 32];
  alignas(64) uint16_t b[16 * 32];
  alignas(64) float c[16 * 16];
  for (int i = 0; i < 16 * 32; ++i) {
    a[i] = 0x3c00;  // bf16 2^-7
    b[i] = 0x3a80;  // bf16 2^-10
  }
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, b, 64);
  for (int64_t it = 0; it < iterations; ++it) {
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 5);
    _tile_dpbf16ps(2, 4, 5);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, c, 64);
  float sum = c[0] + c[255];
  _tile_stored(3, c, 64);
  sum += c[17];
  _tile_release();
  return sum;
}

}  // namespace da::bench

#include "engine/cpu/widen_rows.h"

#include "engine/cpu/attention_kernel.h"
#include "engine/device.h"

namespace da::engine::cpu {
namespace {

bool UseF16c() {
  static const bool use = DetectCpuFeatures().f16c && !IsPortable(SelectedIsa());
  return use;
}

}  // namespace

void WidenRow(DType dtype, const void* data, int64_t base, int64_t count, float factor,
              float* out) {
  switch (dtype) {
    case DType::kFloat32: {
      const float* in = static_cast<const float*>(data) + base;
      for (int64_t i = 0; i < count; ++i) out[i] = factor * in[i];
      return;
    }
    case DType::kBFloat16: {
      const uint16_t* in = static_cast<const uint16_t*>(data) + base;
      for (int64_t i = 0; i < count; ++i) out[i] = factor * BFloat16ToFloat(in[i]);
      return;
    }
    case DType::kFloat16: {
      const uint16_t* in = static_cast<const uint16_t*>(data) + base;
      if (UseF16c()) {
        f16c::WidenHalfRow(in, count, factor, out);
      } else {
        for (int64_t i = 0; i < count; ++i) out[i] = factor * HalfToFloat(in[i]);
      }
      return;
    }
  }
}

}  // namespace da::engine::cpu

// The fp64 reference's output for a test's tensors, to compare a backend or a path with.
#pragma once

#include <gtest/gtest.h>

#include "engine/reference/reference_backend.h"
#include "engine/test_tensors.h"

namespace da::engine::testing {

// DilatedAttention(q, k, v) under spec by the reference backend, in out_dtype; the output starts
// poisoned, so an element it did not write shows. A failed run fails the calling test.
inline OwnedTensor ReferenceOutput(const OwnedTensor& q, const OwnedTensor& k, const OwnedTensor& v,
                                   const AttentionSpec& spec, DType out_dtype) {
  OwnedTensor out = PoisonedTensor(out_dtype, q.shape);
  const absl::Status ran =
      ReferenceBackend().Run(q.view(), k.view(), v.view(), spec, out.mutable_view(), {});
  EXPECT_TRUE(ran.ok()) << ran;
  return out;
}

}  // namespace da::engine::testing

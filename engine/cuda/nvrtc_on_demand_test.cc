// engine/cuda/nvrtc_on_demand.cc: a process with the CUDA backend starts without libnvrtc, and
// the first nvrtc call loads it and works (nvrtc compiles without a GPU: a kernel for sm_90).
#include "engine/cuda/nvrtc_on_demand.h"

#include <gtest/gtest.h>
#include <nvrtc.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

bool Mapped(const std::string& library) {
  std::ifstream maps("/proc/self/maps");
  std::stringstream text;
  text << maps.rdbuf();
  return text.str().find(library) != std::string::npos;
}

TEST(NvrtcOnDemandTest, LoadedOnTheFirstCallAndCompilesAKernel) {
  EXPECT_FALSE(Mapped(DA_NVRTC_SONAME)) << DA_NVRTC_SONAME << " was loaded at start";
  const char* source = "extern \"C\" __global__ void twice(float* x) { x[threadIdx.x] *= 2; }";
  nvrtcProgram program = nullptr;
  ASSERT_EQ(nvrtcCreateProgram(&program, source, "twice.cu", 0, nullptr, nullptr), NVRTC_SUCCESS);
  EXPECT_TRUE(Mapped(DA_NVRTC_SONAME));
  const char* options[] = {"-arch=sm_90"};
  const nvrtcResult compiled = nvrtcCompileProgram(program, 1, options);
  size_t log_size = 0;
  ASSERT_EQ(nvrtcGetProgramLogSize(program, &log_size), NVRTC_SUCCESS);
  std::string log(log_size, '\0');
  ASSERT_EQ(nvrtcGetProgramLog(program, log.data()), NVRTC_SUCCESS);
  ASSERT_EQ(compiled, NVRTC_SUCCESS) << log;
  size_t cubin_size = 0;
  ASSERT_EQ(nvrtcGetCUBINSize(program, &cubin_size), NVRTC_SUCCESS);
  ASSERT_GT(cubin_size, 4u);
  std::vector<char> cubin(cubin_size);
  ASSERT_EQ(nvrtcGetCUBIN(program, cubin.data()), NVRTC_SUCCESS);
  EXPECT_EQ(std::string(cubin.data(), 4),
            "\x7f"
            "ELF");
  EXPECT_EQ(nvrtcDestroyProgram(&program), NVRTC_SUCCESS);
  EXPECT_EQ(program, nullptr);

  // A kernel that does not compile: the error and its log come back through the same calls.
  ASSERT_EQ(nvrtcCreateProgram(&program, "__global__ void broken() { undeclared(); }", "broken.cu",
                               0, nullptr, nullptr),
            NVRTC_SUCCESS);
  EXPECT_EQ(nvrtcCompileProgram(program, 1, options), NVRTC_ERROR_COMPILATION);
  ASSERT_EQ(nvrtcGetProgramLogSize(program, &log_size), NVRTC_SUCCESS);
  log.assign(log_size, '\0');
  ASSERT_EQ(nvrtcGetProgramLog(program, log.data()), NVRTC_SUCCESS);
  EXPECT_NE(log.find("undeclared"), std::string::npos) << log;
  EXPECT_EQ(nvrtcDestroyProgram(&program), NVRTC_SUCCESS);
  EXPECT_TRUE(da::engine::cuda::LoadNvrtc());  // Open already: what cuDNN's use asks first.
}

}  // namespace

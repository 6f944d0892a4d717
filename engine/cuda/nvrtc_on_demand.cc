// libnvrtc, loaded the first time it is called instead of when a process starts.
//
// The cuDNN frontend's headers call seven nvrtc functions (its experimental sm100 RMS-norm engine
// compiles a kernel at run time; da's attention graphs never reach it), and so every binary with
// the CUDA backend named libnvrtc.so among the libraries it needs: 109 MB whose loading and
// relocation took 14.5 ms of each process's start on the build machine (libcudart 2.2 ms, a
// program with neither 1.3 ms): every test process, every da-client, every da-server. The
// functions below stand in for the library's: each opens it on its first call (dlopen of the
// soname of the toolkit built against, DA_NVRTC_SONAME) and calls the library's own. Where it
// cannot be opened, they return NVRTC_ERROR_INTERNAL_ERROR, and the reason goes to stderr once.
// Before cuDNN is first used it is opened anyway (LoadNvrtc, nvrtc_on_demand.h says why).
#include "engine/cuda/nvrtc_on_demand.h"

#include <dlfcn.h>
#include <nvrtc.h>

#include <cstdio>
#include <type_traits>

namespace {

void* Library() {
  static void* const handle = [] {
    void* opened = dlopen(DA_NVRTC_SONAME, RTLD_NOW | RTLD_LOCAL);
    if (opened == nullptr) {
      std::fprintf(stderr, "da: cannot load %s for the cuDNN frontend: %s\n", DA_NVRTC_SONAME,
                   dlerror());
    }
    return opened;
  }();
  return handle;
}

// Calls the library's function of the same name as `declared` (this file's own definition).
template <auto* declared, typename... Args>
nvrtcResult Forward(const char* name, Args... args) {
  using Function = std::remove_pointer_t<decltype(declared)>;
  static Function* const real = [name] {
    void* handle = Library();
    if (handle == nullptr) return static_cast<Function*>(nullptr);
    auto* found = reinterpret_cast<Function*>(dlsym(handle, name));
    if (found == nullptr) {
      std::fprintf(stderr, "da: %s has no %s: %s\n", DA_NVRTC_SONAME, name, dlerror());
    }
    return found;
  }();
  if (real == nullptr) return NVRTC_ERROR_INTERNAL_ERROR;
  return real(args...);
}

}  // namespace

namespace da::engine::cuda {

bool LoadNvrtc() { return Library() != nullptr; }

}  // namespace da::engine::cuda

// Hidden: they stand in for libnvrtc's inside the binary they are linked into, never for another
// library's calls.
#pragma GCC visibility push(hidden)
extern "C" {

nvrtcResult nvrtcCreateProgram(nvrtcProgram* prog, const char* src, const char* name,
                               int numHeaders, const char* const* headers,
                               const char* const* includeNames) {
  return Forward<&nvrtcCreateProgram>("nvrtcCreateProgram", prog, src, name, numHeaders, headers,
                                      includeNames);
}

nvrtcResult nvrtcDestroyProgram(nvrtcProgram* prog) {
  return Forward<&nvrtcDestroyProgram>("nvrtcDestroyProgram", prog);
}

nvrtcResult nvrtcCompileProgram(nvrtcProgram prog, int numOptions, const char* const* options) {
  return Forward<&nvrtcCompileProgram>("nvrtcCompileProgram", prog, numOptions, options);
}

nvrtcResult nvrtcGetCUBINSize(nvrtcProgram prog, size_t* cubinSizeRet) {
  return Forward<&nvrtcGetCUBINSize>("nvrtcGetCUBINSize", prog, cubinSizeRet);
}

nvrtcResult nvrtcGetCUBIN(nvrtcProgram prog, char* cubin) {
  return Forward<&nvrtcGetCUBIN>("nvrtcGetCUBIN", prog, cubin);
}

nvrtcResult nvrtcGetProgramLogSize(nvrtcProgram prog, size_t* logSizeRet) {
  return Forward<&nvrtcGetProgramLogSize>("nvrtcGetProgramLogSize", prog, logSizeRet);
}

nvrtcResult nvrtcGetProgramLog(nvrtcProgram prog, char* log) {
  return Forward<&nvrtcGetProgramLog>("nvrtcGetProgramLog", prog, log);
}

}  // extern "C"
#pragma GCC visibility pop

# da_dist_nccl: the NCCL backend of dist::Communicator (included from engine/CMakeLists.txt when
# CUDA is on and NCCL was found). Host code only: no kernels, so a plain .cc built by the C++
# compiler against the CUDA runtime and libnccl.
add_library(da_dist_nccl STATIC dist/nccl_communicator.cc dist/nccl_local_group.cc
  dist/cuda_staging.cc)
target_include_directories(da_dist_nccl PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(da_dist_nccl
  PUBLIC absl::status absl::statusor
  PRIVATE absl::strings CUDA::cudart da::nccl da_build_flags)

if(DA_BUILD_TESTS)
  include(GoogleTest)
  add_executable(nccl_communicator_test dist/nccl_communicator_test.cc)
  target_link_libraries(nccl_communicator_test
    PRIVATE da_dist_nccl CUDA::cudart GTest::gtest da_build_flags)
  # The test spawns itself for the multi-process cases, and skips without GPUs.
  gtest_discover_tests(nccl_communicator_test DISCOVERY_TIMEOUT 60
    PROPERTIES LABELS "gpu" TIMEOUT 300)
endif()

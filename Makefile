# The two commands users and CI rely on:
#   make serve   install what serving needs, build da-server and da-client (Release), run
#                da-server on CPU with its defaults
#   make test    install what is missing, build, run every test through ctest (and the sanitizer,
#                ThreadSanitizer and fuzz runs first)
BUILD_DIR ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
SERVE_ARGS ?=
# New build trees use Ninja (ninja-build, from scripts/install-deps): it compiles a target's
# sources while the libraries it links are still building, which CMake's Makefiles do not, and so
# keeps both of CI's two cores busy for longer. A tree configured before keeps its generator.
generator = $(if $(wildcard $(1)/CMakeCache.txt),,-G Ninja)
DEPS_STAMP := $(BUILD_DIR)/.deps-installed
SERVE_DEPS_STAMP := $(BUILD_DIR)/.deps-serve-installed

.PHONY: all deps configure build sanitize sanitize-server tsan fuzz serve test test-gpu clean

all: build

# install-deps is idempotent; the stamp skips even its few seconds until the script changes.
$(DEPS_STAMP): scripts/install-deps
	scripts/install-deps
	@mkdir -p $(BUILD_DIR) && touch $@

$(SERVE_DEPS_STAMP): scripts/install-deps
	scripts/install-deps serve
	@mkdir -p $(BUILD_DIR) && touch $@

deps: $(DEPS_STAMP)

$(BUILD_DIR)/CMakeCache.txt: $(DEPS_STAMP)
	cmake $(call generator,$(BUILD_DIR)) -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release \
	  -DDA_BUILD_TESTS=ON $(CMAKE_FLAGS)

# A tree `make serve` configured has no tests: turn them on.
configure: $(BUILD_DIR)/CMakeCache.txt
	@grep -q '^DA_BUILD_TESTS:BOOL=ON' $(BUILD_DIR)/CMakeCache.txt || \
	  cmake -S . -B $(BUILD_DIR) -DDA_BUILD_TESTS=ON

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

# Only what serving needs: the serving packages, the server and the client (in a tree configured
# for tests already, only those two targets).
serve: $(SERVE_DEPS_STAMP)
	@test -f $(BUILD_DIR)/CMakeCache.txt || \
	  cmake -G Ninja -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release -DDA_BUILD_TESTS=OFF $(CMAKE_FLAGS)
	cmake --build $(BUILD_DIR) -j $(JOBS) --target da-server da-client
	exec $(BUILD_DIR)/bin/da-server $(SERVE_ARGS)

# Small kernel and reference cases under AddressSanitizer and UndefinedBehaviorSanitizer, on every
# instruction-set path this CPU has; the sharding geometry, the share sweep and local shard groups.
# It is also the check that a build without CUDA works: configured with CUDA off, it builds the
# engine libraries (the core and every backend; da_engine itself is an interface library over
# them) and the CUDA backend's host side.
SANITIZE_DIR ?= build-sanitize
SANITIZE_FILTER := CpuKernelTest.KeptCounts*:CpuKernelTest.HeadDims*:CpuKernelTest.Widened*:CpuKernelTest.HalfPrecision*:*/CpuKernelBf16Test.*:CpuBackendTest.*
sanitize: $(DEPS_STAMP)
	cmake $(call generator,$(SANITIZE_DIR)) -S . -B $(SANITIZE_DIR) \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDA_WITH_CUDA=OFF \
	  -DDA_BUILD_SERVER=OFF -DDA_SANITIZE=address,undefined
	cmake --build $(SANITIZE_DIR) -j $(JOBS) --target cpu_kernel_test cpu_backend_test \
	  reference_backend_test share_run_test shard_plan_test multi_device_test device_memory_test \
	  da_engine_core da_backend_cpu da_backend_reference da_cuda_host
	$(SANITIZE_DIR)/bin/reference_backend_test --gtest_brief=1
	$(SANITIZE_DIR)/bin/shard_plan_test --gtest_brief=1
	$(SANITIZE_DIR)/bin/share_run_test --gtest_brief=1
	$(SANITIZE_DIR)/bin/multi_device_test --gtest_brief=1
	$(SANITIZE_DIR)/bin/device_memory_test --gtest_brief=1
	for isa in avx512 avx2 portable portable-sse2; do \
	  DA_CPU_ISA=$$isa $(SANITIZE_DIR)/bin/cpu_kernel_test --gtest_brief=1 \
	    --gtest_filter='$(SANITIZE_FILTER)' || exit 1; \
	  DA_CPU_ISA=$$isa $(SANITIZE_DIR)/bin/cpu_backend_test --gtest_brief=1 \
	    --gtest_filter='CpuBackendTest.*:*N64_set1_H8kv2_causal_*' || exit 1; \
	done

# The plan cache's concurrency (single-flight, eviction while in use), the engine's admission
# (queue, watchdog, cancellation) and its devices (placement, local shard groups) under
# ThreadSanitizer.
TSAN_DIR ?= build-tsan
tsan: $(DEPS_STAMP)
	cmake $(call generator,$(TSAN_DIR)) -S . -B $(TSAN_DIR) \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDA_WITH_CUDA=OFF \
	  -DDA_BUILD_SERVER=OFF -DDA_SANITIZE=thread
	cmake --build $(TSAN_DIR) -j $(JOBS) --target plan_cache_test engine_test \
	  admission_test multi_device_test device_memory_test
	$(TSAN_DIR)/bin/plan_cache_test --gtest_brief=1
	$(TSAN_DIR)/bin/engine_test --gtest_brief=1
	$(TSAN_DIR)/bin/admission_test --gtest_brief=1
	$(TSAN_DIR)/bin/multi_device_test --gtest_brief=1
	$(TSAN_DIR)/bin/device_memory_test --gtest_brief=1

# libFuzzer targets over request validation and stream assembly, built by Debian's clang with
# ASan/UBSan in a build directory of their own, each run for FUZZ_SECONDS (side by side, one core
# each) from the seed corpus in tests/fuzz/corpus (docs/FUZZING.md). Any crash, sanitizer report or leak fails the target.
FUZZ_DIR ?= build-fuzz
FUZZ_SECONDS ?= 35
FUZZ_TARGETS := fuzz_request_validation fuzz_stream_assembly
fuzz: $(DEPS_STAMP)
	cmake $(call generator,$(FUZZ_DIR)) -S . -B $(FUZZ_DIR) \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
	  -DDA_WITH_CUDA=OFF -DDA_BUILD_TESTS=OFF -DDA_FUZZ=ON
	cmake --build $(FUZZ_DIR) -j $(JOBS) --target $(FUZZ_TARGETS)
	scripts/run-fuzz $(FUZZ_DIR) $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# The server, the clients and their tests (in-process and spawned servers, the Python clients
# against them) under AddressSanitizer and UndefinedBehaviorSanitizer. Not part of `make test`:
# about 25 min to build and 25 to run on 2 cores. Reports go to files in $(SANITIZE_SERVER_DIR)/
# reports (any report fails the target, as does any test). Left out: tests that measure resident
# memory, page faults, throughput or timing, which the sanitizers' overhead fails without a
# finding; the drain tests, whose calls take longer than ctest's 120 s under the sanitizers, run
# without ctest's limit. libcares' 10-byte leak in da-client (resolving "localhost") is not ours.
SANITIZE_SERVER_DIR ?= build-sanitize-server
SANITIZE_SERVER_SKIP := StreamMemoryTest.HalfAMillionTokens|StreamAdmissionTest.AnAdmittedStream|StreamBlocksTest.ResizeUninitialized|DrainTest|load_smoke|python_hostile|local_stack|netns_three_hosts
SANITIZE_SERVER_ENV = LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp:print_suppressions=0 \
  ASAN_OPTIONS=log_path=$(abspath $(SANITIZE_SERVER_DIR))/reports/asan \
  UBSAN_OPTIONS=log_path=$(abspath $(SANITIZE_SERVER_DIR))/reports/ubsan:print_stacktrace=1
sanitize-server: $(DEPS_STAMP)
	cmake $(call generator,$(SANITIZE_SERVER_DIR)) -S . -B $(SANITIZE_SERVER_DIR) \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDA_WITH_CUDA=OFF -DDA_SANITIZE=address,undefined
	cmake --build $(SANITIZE_SERVER_DIR) -j $(JOBS)
	rm -rf $(SANITIZE_SERVER_DIR)/reports && mkdir -p $(SANITIZE_SERVER_DIR)/reports
	cd $(SANITIZE_SERVER_DIR) && $(SANITIZE_SERVER_ENV) ctest -j $(JOBS) --output-on-failure \
	  -L 'server|client|python|e2e|load' -E '$(SANITIZE_SERVER_SKIP)'
	$(SANITIZE_SERVER_ENV) $(SANITIZE_SERVER_DIR)/bin/drain_test --gtest_brief=1 \
	  --gtest_filter='-DrainTest.DrainDeadline*:*CrossesTheGoaway*'
	$(SANITIZE_SERVER_ENV) $(SANITIZE_SERVER_DIR)/bin/drain_goaway_test --gtest_brief=1 \
	  --gtest_filter='*CrossesTheGoaway*'
	@if grep -l -E 'ERROR: |runtime error' $(SANITIZE_SERVER_DIR)/reports/* 2>/dev/null; then \
	  cat $(SANITIZE_SERVER_DIR)/reports/*; exit 1; fi

test: build sanitize tsan fuzz
	cd $(BUILD_DIR) && ctest -j $(JOBS) --output-on-failure --timeout 600

# On a machine with GPUs: build with CUDA and NCCL required, run the tests labelled gpu.
test-gpu:
	scripts/run-gpu-tests

clean:
	rm -rf $(BUILD_DIR) build-nocuda $(SANITIZE_DIR) $(SANITIZE_SERVER_DIR) $(TSAN_DIR) $(FUZZ_DIR)

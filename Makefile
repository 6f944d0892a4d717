# The two commands users and CI rely on:
#   make serve   install what is missing, build Release, run da-server on CPU with its defaults
#   make test    install what is missing, build, run every test through ctest
BUILD_DIR ?= build
NOCUDA_DIR ?= build-nocuda
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
SERVE_ARGS ?=
DEPS_STAMP := $(BUILD_DIR)/.deps-installed

.PHONY: all deps configure build build-nocuda serve test clean

all: build

# install-deps is idempotent; the stamp skips even its few seconds until the script changes.
$(DEPS_STAMP): scripts/install-deps
	scripts/install-deps
	@mkdir -p $(BUILD_DIR) && touch $@

deps: $(DEPS_STAMP)

$(BUILD_DIR)/CMakeCache.txt: $(DEPS_STAMP)
	cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

configure: $(BUILD_DIR)/CMakeCache.txt

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

serve: build
	exec $(BUILD_DIR)/bin/da-server $(SERVE_ARGS)

# A build without CUDA must work too: configure once with CUDA off and build the engine library.
build-nocuda: $(DEPS_STAMP)
	cmake -S . -B $(NOCUDA_DIR) -DCMAKE_BUILD_TYPE=Release -DDA_WITH_CUDA=OFF \
	  -DDA_BUILD_SERVER=OFF -DDA_BUILD_TESTS=OFF
	cmake --build $(NOCUDA_DIR) -j $(JOBS) --target da_engine

test: build build-nocuda
	cd $(BUILD_DIR) && ctest -j $(JOBS) --output-on-failure --timeout 600

clean:
	rm -rf $(BUILD_DIR) $(NOCUDA_DIR)

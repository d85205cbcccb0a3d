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

.PHONY: install demo test test-main test-compat test-zero3 lint format bench clean

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

# Everything, then the fast tests again on the compat transformers, then ZeRO-3 with DeepSpeed.
test: test-main test-compat test-zero3

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

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks/*.py

format: install
	$(VENV)/bin/ruff format src tests benchmarks/*.py
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: install
	$(VENV)/bin/ssb bench --out bench --stage-times-from $(RUN_DIR)

clean:
	rm -rf $(VENV) .compat .pytest_cache .ruff_cache

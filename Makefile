# Two commands do all the set-up: `make demo` and `make test`.
# PYTHON picks the base interpreter; the venv sees its site-packages, so an existing
# torch (for example a CUDA build) is reused and the CPU wheel is installed only where
# none is importable.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-app
DEV_STAMP := $(VENV)/.installed-dev
TORCH_SPEC ?= torch==2.13.0
LOGDIR ?= runs
PORT ?= 8501

.PHONY: install test demo demo-train dashboard bench clean

install: $(DEV_STAMP)

# the monitor and the dashboard: what `make demo` needs
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dashboard]"
	touch $(STAMP)

# and what the tests need (pytest, transformers, accelerate, lightning, playwright)
$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(DEV_STAMP)

test: $(DEV_STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) demos/launch.py --logdir $(LOGDIR) --port $(PORT) $(DEMO_ARGS)

demo-train: $(STAMP)
	$(PY) demos/train_chargpt.py --logdir $(LOGDIR)

dashboard: $(STAMP)
	$(PY) -m streamlit run dashboard/app.py --server.address 127.0.0.1 --server.port $(PORT) -- --logdir $(LOGDIR)

bench: $(STAMP)
	$(PY) benchmarks/bench_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache

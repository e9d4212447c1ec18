# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, run the whole pipeline on the embedded toy world
#   make test   create .venv, install, run the test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: demo test install clean

install: $(STAMP)

# torch/torchvision are pinned to the releases on this platform's local disk (a CUDA build that
# also runs on CPU); faiss-cpu comes with the [cpu] extra (use [gpu] for faiss-gpu, never both);
# [serve] is FastAPI + uvicorn for `tvrerank serve`.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[cpu,serve,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tvrerank demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache

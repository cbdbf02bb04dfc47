# Both targets create or reuse .venv. The torch pair is pinned to the build that matches torchvision.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.vitkit-installed
# The demo's data: $(DATA), else $VITKIT_DATA, else the shared CIFAR-10 training split beside the repo.
DATA ?= $(if $(VITKIT_DATA),$(VITKIT_DATA),../shared/data/cifar10-jpeg/train)
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev]' $(TORCH_PINS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vitkit train --recipe cifar10-quick --data $(DATA) --out $(DEMO_OUT) --overwrite
	$(VENV)/bin/vitkit eval --checkpoint $(DEMO_OUT)/best.ckpt --data $(DATA)
	$(VENV)/bin/vitkit predict --checkpoint $(DEMO_OUT)/best.ckpt --top-k 3 \
		$$(ls -d $(DATA)/*/ | head -3 | xargs -I{} sh -c 'ls {}*.jpg {}*.png 2>/dev/null | head -1')

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# The lint rules only: the code is wrapped by hand to 120 columns (signatures and short lists on
# one line, as in vitkit/model/vit.py), which `ruff format` would unfold, so no formatter is enforced.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache

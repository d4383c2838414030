# The two commands a fresh machine needs:
#   make demo   set everything up (.venv) and run the main job on the built-in defaults
#   make test   the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench-smoke clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	./scripts/setup.sh $(VENV)
	touch $@

demo: setup
	RAY_USAGE_STATS_ENABLED=0 $(VENV)/bin/meda annotate

test: setup
	$(PY) -m pytest

bench-smoke: setup
	$(PY) -m pytest -m bench

clean:
	rm -rf $(VENV) out

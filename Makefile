# Two entry points for a newcomer: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo_out
# The demo's size: 100 faces per class at the seed's 256x256 trains in a few minutes on 2 cores.
DEMO_PER_CLASS ?= 100
DEMO_IMAGE_SIZE ?= 256
DEMO_EPOCHS ?= 12

.PHONY: install demo test test-fast bench check-ui clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	rm -rf $(DEMO)
	$(BIN)/emotion-ray demo-data $(DEMO)/images --per-class $(DEMO_PER_CLASS) --seed 0
	$(BIN)/emotion-ray prepare --input $(DEMO)/images --output $(DEMO)/dataset --image-size $(DEMO_IMAGE_SIZE)
	$(BIN)/emotion-ray train --data $(DEMO)/dataset --output $(DEMO)/runs --run-name demo --workers 2 \
		--epochs $(DEMO_EPOCHS) --tracking-uri sqlite:///$(abspath $(DEMO))/mlflow.db
	$(BIN)/emotion-ray demo-data $(DEMO)/to_score --per-class 20 --seed 99
	$(BIN)/emotion-ray score --model $(DEMO)/runs/demo --input $(DEMO)/to_score --output $(DEMO)/predictions
	$(BIN)/python -m emotion_ray.summary $(DEMO)

test: install
	$(BIN)/python -m pytest

# The inner loop: tests that need no Ray, TensorFlow or server (pytest -m fast), under a minute.
test-fast: install
	$(BIN)/python -m pytest -m fast -q

bench: install
	$(BIN)/python -m bench.prepare
	$(BIN)/python -m bench.train
	$(BIN)/python -m bench.train --recipe
	$(BIN)/python -m bench.score
	$(BIN)/python -m bench.faces
	$(BIN)/python -m bench.quality
	$(BIN)/python -m bench.startup

# What an MLflow user sees: the UI in headless Chromium (apt-get install chromium) on a small fresh
# run; screenshots and result.json in bench/ui_check/. Not part of `make test`: CI has no browser.
# `make check-ui UI_STORE=demo_out` checks the store `make demo` left instead.
UI_STORE ?=
$(BIN)/.ui-check-installed: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[ui-check]'
	touch $@

check-ui: $(BIN)/.ui-check-installed
	$(BIN)/python -m bench.mlflow_ui_check $(if $(UI_STORE),--store $(UI_STORE))

clean:
	rm -rf $(DEMO) .pytest_cache

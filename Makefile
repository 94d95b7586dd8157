# Quick start: `make demo` then `make test`. Both install into .venv/ first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data
DEMO_RUN := logs/demo

.PHONY: install demo demo-steps test clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory demo-steps && \
	echo "make demo took $$(( $$(date +%s) - start )) s"

demo-steps: install
	$(PY) tools/generate_toy_data.py --root_dir $(DEMO_DATA)
	$(PY) train.py --config_file configs/demo.yaml --root_dir $(DEMO_DATA) --output_dir $(DEMO_RUN) --overwrite
	$(PY) test.py --config_file $(DEMO_RUN)/configs.yaml

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO_RUN) $(DEMO_DATA)/CUHK-PEDES .pytest_cache

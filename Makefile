# QuantLab Collector. `make run` and `make test` work on a fresh machine with python3 (>= 3.10).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
SOAK_MINUTES ?= 15

.PHONY: run test demo bench soak sanity clean

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

## run: install into .venv and start the collector on local storage (./data), settings.ini
run: $(VENV)/.runtime
	$(PY) bin/collector $(ARGS)

## test: the whole test suite (unit + integration against the bundled simulator, moto S3, supervisord)
test: $(VENV)/.dev
	$(PY) -m pytest -q $(ARGS)

## demo: the bundled exchange simulator on loopback and the collector against it (Ctrl-C stops)
demo: $(VENV)/.dev
	$(PY) bin/demo $(ARGS)

## bench: firehose simulator -> collector -> Parquet; prints figures, last line is JSON
bench: $(VENV)/.dev
	$(PY) bench/run.py $(ARGS)

## soak: faults schedule over minutes (SOAK_MINUTES), reconciliation report, last line is JSON
soak: $(VENV)/.dev
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES) $(ARGS)

## sanity: check stored RAW data (bin/check_raw_sanity)
sanity: $(VENV)/.runtime
	$(PY) bin/check_raw_sanity $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

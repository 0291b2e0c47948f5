# Two commands set everything up on a fresh clone: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# mmcv 2.1 with compiled ops (mmdet's dependency) is not on PyPI as a wheel: a prebuilt one is installed from
# WHEELS when there; without it mmdet is left out and its tests skip (build it as ../shared/wheels/README.md says)
WHEELS ?= $(firstword $(wildcard ../shared/wheels /work/shared/wheels))
MMCV_WHEEL := $(firstword $(wildcard $(WHEELS)/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl))
comma := ,
EXTRAS := $(if $(MMCV_WHEEL),dev$(comma)mmdet,dev)

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" "setuptools>=68" wheel
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet $(MMCV_WHEEL) -e ".[$(EXTRAS)]"
	$(if $(MMCV_WHEEL),,@echo "no mmcv wheel found (WHEELS=$(WHEELS)): mmdet not installed and its tests will skip")
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m experiments.probe_digits

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m experiments.bench_extract

clean:
	rm -rf $(VENV) .cache

# Everything runs inside a local virtual environment built from requirements.lock (pinned).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Variables for the user-facing targets.
CKPT      ?=
SPM       ?=
DICT      ?=
OUT       ?= artifacts/model
# the artifact parity / translate / engines / serve use: the one `make export` wrote, else the demo's
DIR       ?= $(if $(wildcard $(OUT)/manifest.json),$(OUT),demo/artifact)
PRECISION ?= fp32
INPUT     ?=
SOURCE    ?=
TARGET    ?=
BACKEND   ?= ort
BEAM      ?= 5
MODEL     ?= tiny
COMPARE   ?=
QUICK     ?=
PORT      ?= 8000
HOST      ?= 127.0.0.1

.PHONY: venv demo test docs lint test-fairseq export parity translate score engines bench bench-export-memory soak gpu-check clean serve bench-serve

venv: $(STAMP)

# The package is installed editable in setuptools' strict mode (a tree of links, which mypy and the
# docs generator read as a plain package): a module added or removed needs the install again, so
# the list of the package's files is a prerequisite, rewritten only when it changes.
PACKAGE_FILES := $(sort $(wildcard runtime/*.py runtime/*/*.py export/*.py bench/*.py serve/*.py serve/static/* \
                                   cluster/*.py configs/*.json))
build/package-files: FORCE
	@mkdir -p build
	@echo '$(PACKAGE_FILES)' | cmp -s - $@ || echo '$(PACKAGE_FILES)' > $@

.PHONY: FORCE
FORCE:

$(STAMP): requirements.lock pyproject.toml build/package-files
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --workdir demo

test: $(STAMP)
	$(PY) -m pytest tests

# The documentation site, strictly (a broken link or a moved API fails): build/site/index.html.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# What make test checks of the code's form, alone: ruff (lint, format) and mypy on the library.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Opt-in: our search loop against fairseq's own SequenceGenerator (builds fairseq, ~5 minutes once).
FSVENV := .venv-fairseq
$(FSVENV)/.installed:
	$(PYTHON) -m venv $(FSVENV)
	$(FSVENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0 numpy==2.4.6 cython==3.3.1 setuptools==84.2.1 wheel
	$(FSVENV)/bin/pip install -q --disable-pip-version-check --no-build-isolation fairseq-fixed==0.12.3.1
	$(FSVENV)/bin/pip install -q --disable-pip-version-check sentencepiece==0.2.3 onnxruntime==1.32.0
	$(FSVENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

test-fairseq: $(FSVENV)/.installed
	$(FSVENV)/bin/python scripts/fairseq_reference.py | tail -1

export: $(STAMP)
	@test -n "$(CKPT)" || (echo "usage: make export CKPT=checkpoint.pt SPM=spm.model DICT=dict.txt OUT=dir [PRECISION=fp32|fp16|int8]"; exit 2)
	$(VENV)/bin/deltalm export $(CKPT) $(if $(SPM),--spm $(SPM)) $(if $(DICT),--dict $(DICT)) --out $(OUT) --precision $(PRECISION)

parity: $(STAMP)
	$(VENV)/bin/deltalm parity $(DIR)

# SOURCE / TARGET: one sentence a line, the same order
score: $(STAMP)
	@test -n "$(SOURCE)" -a -n "$(TARGET)" || (echo "usage: make score [DIR=artifact_dir] SOURCE=src.txt TARGET=tgt.txt"; exit 2)
	$(VENV)/bin/deltalm score $(DIR) --source $(SOURCE) --target $(TARGET) --format jsonl

translate: $(STAMP)
	$(VENV)/bin/deltalm translate $(DIR) --backend $(BACKEND) --beam $(BEAM) $(if $(INPUT),--input $(INPUT))

engines: $(STAMP)
	$(VENV)/bin/deltalm engines $(DIR)

serve: $(STAMP)
	@test -d "$(DIR)" || (echo "usage: make serve DIR=artifact_dir [PORT=8000] [HOST=127.0.0.1]"; exit 2)
	$(VENV)/bin/deltalm serve $(DIR) --host $(HOST) --port $(PORT)

bench-serve: $(STAMP)
	$(VENV)/bin/deltalm bench-serve --model $(MODEL) --out bench_out/serve-$(MODEL)

# MODEL=tiny | base | an artifact directory; COMPARE=ctranslate2 runs only the side-by-side comparison; QUICK=1.
bench: $(STAMP)
	$(VENV)/bin/deltalm bench --model $(MODEL) --out bench_out/$(notdir $(MODEL))$(if $(COMPARE),-$(COMPARE)) \
		$(if $(COMPARE),--compare $(COMPARE)) $(if $(QUICK),--quick)

# The export's memory: peak RSS and time of every stage of deltalm export (fp32 and int8) on fairseq
# checkpoints of deltalm-base's and deltalm-large's shapes written here (large: 3.4 GB, ~10 GB of RAM free).
SHAPES ?= base,large
bench-export-memory: $(STAMP)
	$(VENV)/bin/deltalm bench --export-memory --shapes $(SHAPES) --out bench_out/export-memory

soak: $(STAMP)
	$(PY) scripts/soak.py

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf demo bench_out artifacts .pytest_cache

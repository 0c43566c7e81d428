# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install demo test test-all bundle bundle-gpu clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, from the local wheel; a plain `torch` would pull GBs of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/controlstack demo --out outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=15 tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m '' tests

# Train the bundled default model (VAE, base, ControlNets); skips done stages, resumes the rest.
bundle: $(STAMP)
	$(BIN)/python -m controlstack.training.bundle $(if $(STAGES),--stages $(STAGES))

# Bundle v3 on one GPU: the bundled VAE (copied into bundle-v3/), then the base and the ControlNets with
# the GPU configs, each stage sized to a wall-time budget by a short probe (docs/training.md).
bundle-gpu: $(STAMP)
	@test -d bundle-v3/vae || { mkdir -p bundle-v3 && cp -r src/controlstack/assets/bundle/vae bundle-v3/ && $(BIN)/python -c \
	  "import json; d = json.load(open('src/controlstack/assets/bundle/stages.json')); json.dump({k: d[k] for k in ('vae', 'vae-decoder')}, open('bundle-v3/stages.json', 'w'), indent=2)"; }
	$(BIN)/python -m controlstack.training.bundle --bundle bundle-v3 --work outputs/bundle-v3 \
	  --configs src/controlstack/configs/bundle-gpu --budget base=240 --budget controlnet=60 $(if $(STAGES),--stages $(STAGES))

clean:
	rm -rf $(VENV) outputs

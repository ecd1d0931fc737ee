# The two set-up commands of the README. Both create .venv if missing and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SB2 := $(VENV)/bin/sb2
STAMP := $(VENV)/.sb2-installed
DEMO := local_outputs/demo
PROFILE ?= tiny

IMAGE ?= ghcr.io/sb2-project/sb2:latest

.PHONY: install test demo lint clean image push pipeline

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The main job on CPU: build the prompt set from the samples, train both branches on it (tiny profile), merge them,
# generate and export.
demo: $(STAMP)
	$(SB2) prompts build -p $(PROFILE) --out $(DEMO)/prompts
	$(SB2) train --scheme full -p $(PROFILE) --set train.prompts=$(DEMO)/prompts --out $(DEMO)/full
	$(SB2) train --scheme lora -p $(PROFILE) --set train.prompts=$(DEMO)/prompts --out $(DEMO)/lora
	$(SB2) merge $(DEMO)/full/student $(DEMO)/lora/student -p $(PROFILE) --out $(DEMO)/merged
	$(SB2) generate --model $(DEMO)/merged/unet -p $(PROFILE) --prompt-file data/samples/prompts.txt --out $(DEMO)/images
	$(SB2) export --model $(DEMO)/merged/unet -p $(PROFILE) --out $(DEMO)/pipeline
	@echo
	@echo "Demo outputs in $(DEMO)/:"
	@echo "  prompts/                     the prompt set built from data/samples/ (manifest.json, stats.png)"
	@echo "  full/student, lora/student   the two trained branches (samples.png and logs/ beside each)"
	@echo "  merged/unet                  the merged one-step student (lambda in merged/merge.json)"
	@echo "  images/grid.png              one-step images for data/samples/prompts.txt"
	@echo "  pipeline/                    a diffusers StableDiffusionPipeline folder (1 step, guidance 0)"

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
	rm -rf local_outputs .pytest_cache

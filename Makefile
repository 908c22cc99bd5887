# Every target creates .venv and installs the pinned set (constraints.txt) on first use.
PYTHON ?= python3.11
VENV := .venv
VENV_PYTHON := $(abspath $(VENV))/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= build/demo
DEMO_ROWS ?= 60000
# The demo's image URLs point at this port on 127.0.0.1; jobs/configs/demo.yaml allows exactly this host:port.
DEMO_IMAGE_PORT ?= 18765
# faiss-cpu by default; `make FAISS_EXTRA=gpu test` installs faiss-gpu instead on a CUDA machine.
FAISS_EXTRA ?= cpu

# Spark workers must run the venv's interpreter and bind to loopback; no test or demo step may call out.
export PYSPARK_PYTHON := $(VENV_PYTHON)
export PYSPARK_DRIVER_PYTHON := $(VENV_PYTHON)
export SPARK_LOCAL_IP := 127.0.0.1
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: install demo test test-unit test-slow lint docs bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV_PYTHON) || $(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet --upgrade pip
	$(VENV_PYTHON) -m pip install --quiet -c constraints.txt -e '.[dev,wordnet,$(FAISS_EXTRA)]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV_PYTHON) -m curation metadata build --output $(DEMO_DIR)/metadata.json
	$(VENV_PYTHON) -m curation demo-data --metadata $(DEMO_DIR)/metadata.json --output $(DEMO_DIR)/corpus \
		--rows $(DEMO_ROWS) --image-port $(DEMO_IMAGE_PORT) --requests $(DEMO_DIR)/requests
	$(VENV_PYTHON) -m curation demo-images --port $(DEMO_IMAGE_PORT) & server=$$!; trap 'kill $$server' EXIT; \
		sleep 3; kill -0 $$server || { echo "the demo image server did not start (port $(DEMO_IMAGE_PORT) in use?)"; \
		exit 1; }; $(VENV_PYTHON) -m curation run jobs/configs/demo.yaml --output $(DEMO_DIR)/run
	$(VENV_PYTHON) -m curation verify $(DEMO_DIR)/run
	@echo "report: $(abspath $(DEMO_DIR))/run/report.html"

test: $(STAMP)
	$(VENV_PYTHON) -m ruff check .
	$(VENV_PYTHON) -m pytest -q -p no:cacheprovider

# The unit tests: no Spark session, no servers.
test-unit: $(STAMP)
	$(VENV_PYTHON) -m pytest -q -p no:cacheprovider tests/unit

test-slow: $(STAMP)
	$(VENV_PYTHON) -m pytest -q -p no:cacheprovider -m slow

lint: $(STAMP)
	$(VENV_PYTHON) -m ruff check .

# The README's stage, option and stage-command tables, from the stage declarations (curation/stages/).
docs: $(STAMP)
	$(VENV_PYTHON) -m curation.readme_tables README.md

bench: $(STAMP)
	$(VENV_PYTHON) bench/bench_match.py --out bench/results/match.json
	$(VENV_PYTHON) bench/bench_minhash.py --out bench/results/minhash.json
	$(VENV_PYTHON) bench/bench_spine.py --out bench/results/spine.json
	$(VENV_PYTHON) bench/bench_dedup_text.py --out bench/results/dedup_text.json
	$(VENV_PYTHON) bench/bench_dedup_text_extremes.py --out bench/results/dedup_text_extremes.json
	$(VENV_PYTHON) bench/bench_image_dedup.py --out bench/results/image_dedup.json
	$(VENV_PYTHON) bench/bench_embed.py batch
	$(VENV_PYTHON) bench/bench_semdedup.py --out bench/results/semdedup.json
	$(VENV_PYTHON) bench/bench_semdedup_large.py --out bench/results/semdedup_large.json
	$(VENV_PYTHON) bench/bench_kmeans.py --out bench/results/kmeans.json
	$(VENV_PYTHON) bench/bench_slant.py --out bench/results/slant.json
	$(VENV_PYTHON) bench/bench_nsfw.py --out bench/results/nsfw.json

clean:
	rm -rf build $(VENV)

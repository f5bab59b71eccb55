# ntkscale: set-up, demo, tests and benchmarks.
#
#   make demo    create .venv (if needed), install ntkscale with its extras, run the demo
#   make test    the same set-up, then the test suite (slow and GPU tests skip; see README)
#   make bench   the CPU benchmarks, into results/bench (BENCH_ARGS=--quick for small presets)
#   make docs    the API reference and guide (Sphinx) into docs/_build/html
#   make peers   install the [peers] extra (laplace-torch, curvlinops) and run bench_peers.py
#   make clean   remove results and caches; `make distclean` also removes .venv
#
# The install is recorded in a stamp file inside .venv and redone only when pyproject.toml
# changes (or the stamp is removed).

PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ntkscale-installed
EXTRAS ?= test,experiments,keops,docs
# torch is installed first, on its own, at the exact version pyproject.toml pins; where a CPU
# wheel of that version is on local disk (pip's find-links) it is taken, not a CUDA build.
TORCH  := $(shell grep -oE '"torch==[^"]+"' pyproject.toml | tr -d '"')

.PHONY: venv demo test bench docs peers peers-install clean distclean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install '$(or $(TORCH),torch)'
	$(PIP) install -e '.[$(EXTRAS)]'
	@touch $@

demo: venv
	$(VENV)/bin/ntkscale demo --out results/demo

# the venv's bin first on PATH: torch's extension builder looks for ninja there
test: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

# Each benchmark writes JSON with its environment; BENCH_ARGS goes to those with a --quick preset.
BENCH_ARGS ?=
bench: venv
	$(PY) benchmarks/bench_matvec.py --device cpu --out results/bench/matvec.json $(BENCH_ARGS)
	$(PY) benchmarks/bench_gram.py --out results/bench/gram.json $(BENCH_ARGS)
	$(PY) benchmarks/bench_kernel_space.py --device cpu --out results/bench/kernel_space.json $(BENCH_ARGS)
	$(PY) benchmarks/bench_crossover.py --device cpu --out results/bench/crossover.json $(BENCH_ARGS)
	$(PY) benchmarks/bench_memory.py --out results/bench/memory.json
	$(PY) benchmarks/bench_distributed.py --out results/bench/distributed.json $(BENCH_ARGS)

# warnings are errors, as in tests/test_docs.py
docs: venv
	rm -rf docs/_build/html
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

# The [peers] extra without its declared dependencies (laplace-torch and backpack name torchvision,
# which they do not import; resolving it could replace the pinned torch), then `pip check`.
PEERS := $(shell sed -n '/^peers = \[/,/^\]/p' pyproject.toml | grep -oE '"[^"]+"' | tr -d '"')
peers-install: venv
	$(PIP) install --no-deps $(foreach p,$(PEERS),'$(p)')
	-$(PIP) check

peers: peers-install
	$(PY) benchmarks/bench_peers.py --out results/bench/peers.json --figure results/bench/peers.png $(BENCH_ARGS)

clean:
	rm -rf results build dist docs/_build docs/_generated .pytest_cache src/*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# make demo / make test set up .venv in this checkout on first use (torch comes from local disk
# on the project's machines; elsewhere pip downloads it).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXT    := cbir_engine/_C$(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h')

.PHONY: all demo test build lint clean

all: build

APT_PACKAGES := $(shell grep -v '^\#' .ci/apt-packages.txt 2>/dev/null)

# Debian packages (data sets, browsers) the tests use; installed once when missing.
$(VENV)/.apt: .ci/apt-packages.txt
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml setup.py $(VENV)/.apt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel pybind11 numpy
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet --no-build-isolation -e '.[test,demo,distributed]'
	touch $@

$(EXT): $(STAMP) $(CSRC) setup.py
	$(BIN)/python setup.py --quiet build_ext --inplace
	touch $@

build: $(EXT)

demo: build
	$(BIN)/python -m cbir_engine.demo

test: build
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check cbir_engine tests bench

clean:
	rm -rf build cbir_engine/*.so *.egg-info

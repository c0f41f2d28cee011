# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo-out

.PHONY: demo test test-slow test-gpu lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@# FFCV has no wheel: pip builds it against Debian's OpenCV and libjpeg-turbo, so it is
	@# installed where those are (.ci/run installs them); elsewhere its tests skip and say why.
	if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
	  $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[ffcv]'; \
	else echo "note: the ffcv peer is not installed (it needs pkg-config, g++, libturbojpeg0-dev \
	and libopencv-dev); its tests skip"; fi
	touch $(STAMP)

# The main job on the embedded default: prove that every format gives back what went in, then
# run the built-in benchmark (every format, four embedded datasets, 2 repeats: ~5 min on 2 cores).
demo: $(STAMP)
	$(BIN)/loadbench convert digits --format all --out $(DEMO)/stores
	$(BIN)/loadbench verify $(DEMO)/stores --source digits
	$(BIN)/loadbench bench --out $(DEMO)/results --stores $(DEMO)/stores

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu" -n 2

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The tests that need CUDA (marked gpu; each one skips with its reason where there is none). On
# the lent GPU machine scripts/device.sh runs `make test-gpu BIN=.device-venv/bin`: a venv it
# made there from carried wheels, so nothing is installed (that machine reaches no registry).
test-gpu: $(if $(filter $(VENV)/bin,$(BIN)),$(STAMP))
	$(BIN)/python -m pytest -q -m gpu

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(DEMO) .pytest_cache .hypothesis

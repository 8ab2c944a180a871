# The two commands of a fresh machine:
#   make up     install (first time), prepare the bundled model, serve on http://127.0.0.1:8000
#   make test   install (first time), run the whole test suite (starts its own engine)
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml scripts/install.sh | sha1sum | cut -c1-12)
PYTEST_ARGS ?= -q

.PHONY: up test lint install bench
install: $(STAMP)

$(STAMP):
	bash scripts/install.sh
	rm -f $(VENV)/.installed-*
	touch $@

up: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/llmserve up

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)
	HF_HUB_OFFLINE=1 bash scripts/k8s_tests.sh $(PYTEST_ARGS)

# The gates CI runs before the tests: lint and types (mypy with the pydantic plugin; see pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	mkdir -p loadtest-results
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m loadtest.overhead --output loadtest-results/overhead.json

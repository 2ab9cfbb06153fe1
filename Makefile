# The two commands of the README: `make run` and `make test`. Everything they need is
# installed from here (a virtual environment in .venv; Debian packages where a later
# feature needs them), so a fresh Debian machine needs nothing else.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck unit bench clean system-packages

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3-venv missing: installing it with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip; \
	  rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

# Debian packages (Postfix for the integration tests and the local stack, swaks, systemd),
# and Debian's Sendmail unpacked beside Postfix for the Sendmail tests (never installed).
system-packages:
	@bash deploy/install-system-packages.sh
	@bash deploy/install-sendmail-for-tests.sh

run: $(VENV)/.installed system-packages
	@$(BIN)/school-milter check-rules rules
	@echo
	@$(BIN)/school-milter scan rules/examples
	@# The stack's gateway reads var/local-stack/rules: rules/ pointed at the stack's own clamd
	@# (local-stack.sh writes it afresh on every start; edit rules/, never the copy).
	@deploy/local-stack.sh start --with-daemon "$(CURDIR)/$(BIN)/school-milter --rules $(CURDIR)/var/local-stack/rules serve --milter inet:127.0.0.1:8894 --metrics 127.0.0.1:9464 --database sqlite:///$(CURDIR)/var/quarantine.db --reinject 127.0.0.1:2527"
	@echo
	@echo "Also:"
	@echo "  $(BIN)/school-milter scan message.eml --mail-from a.patel@redborne.example --rcpt x@example.org"
	@echo "  curl -s 127.0.0.1:9464/metrics | grep school_milter      # the gateway's metrics"
	@echo "  $(BIN)/school-milter quarantine list --database sqlite:///$(CURDIR)/var/quarantine.db"
	@echo "  $(BIN)/school-milter quarantine release ID --reason '...' --database sqlite:///$(CURDIR)/var/quarantine.db --reinject 127.0.0.1:2527"
	@echo "  $(BIN)/school-milter web-user add admin --role technician --database sqlite:///$(CURDIR)/var/quarantine.db"
	@echo "  $(BIN)/school-milter web --database sqlite:///$(CURDIR)/var/quarantine.db --insecure-http-loopback   # console on 127.0.0.1:8080"
	@echo "  deploy/local-stack.sh status                              # what runs, clamd's signatures"
	@echo "  deploy/local-stack.sh stop                                # stop Postfix, sink, clamd and gateway"

lint: $(VENV)/.installed
	$(BIN)/ruff check milter tests bench tools
	$(BIN)/ruff format --check milter tests bench tools

typecheck: $(VENV)/.installed
	$(BIN)/mypy milter

unit: $(VENV)/.installed system-packages
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench: $(VENV)/.installed
	$(BIN)/python bench/engine_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

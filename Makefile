PYTHON ?= python3.11
VENV := .venv
# Extra pytest arguments: make test ARGS="-k registry -x"
ARGS ?=

.PHONY: run test lint bench clean

run:
	$(PYTHON) scripts/hub.py run

test:
	$(PYTHON) scripts/hub.py test $(ARGS)

# ruff is not in requirements-dev.txt; install it into .venv to lint.
lint:
	@if [ -x $(VENV)/bin/ruff ]; then \
		$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .; \
	else \
		echo "ruff is not installed: $(VENV)/bin/python -m pip install ruff"; \
	fi

bench:
	$(VENV)/bin/python -m bench

# Local state only: the database, Redis data, beat schedule and caches. .venv stays.
clean:
	rm -f var/*.sqlite3 var/*.sqlite3-wal var/*.sqlite3-shm var/*.sqlite3-journal
	rm -f var/celerybeat-schedule var/celerybeat-schedule.*
	rm -rf var/redis var/test-redis .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

# Thin wrappers around the README's commands.
.PHONY: setup run test
setup:
	python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[dev]"
run:
	. .venv/bin/activate && python flows/sft_flow.py run
test:
	. .venv/bin/activate && python -m pytest -q

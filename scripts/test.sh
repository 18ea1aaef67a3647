#!/usr/bin/env bash
# Set up, lint, check the layers and the types, and run the whole test suite (pass pytest
# options, e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check dicomnode tests benchmarks models
.venv/bin/ruff format --check dicomnode tests benchmarks models
.venv/bin/lint-imports   # the layers ([tool.importlinter] in pyproject.toml)
.venv/bin/mypy           # dicomnode and models ([tool.mypy] in pyproject.toml)
.venv/bin/python -m pytest "$@"

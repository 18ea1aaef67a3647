#!/usr/bin/env bash
# Set up, lint, and run the whole test suite (pass pytest options, e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check dicomnode tests benchmarks models
.venv/bin/ruff format --check dicomnode tests benchmarks models
.venv/bin/python -m pytest "$@"

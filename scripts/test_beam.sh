#!/usr/bin/env bash
# samtone-prepare's Apache Beam path, tested in a venv of its own: apache-beam needs
# protobuf<7, which the seqio extra's sentencepiece/TensorFlow code cannot load, so the
# `beam` extra cannot share the test venv (README, Tests). Reuses .venv-beam when present.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-beam/bin/python ]; then
  python3 -m venv .venv-beam
  .venv-beam/bin/pip install --quiet --upgrade pip
fi
.venv-beam/bin/pip install --quiet -e '.[beam]' 'pytest>=8'
.venv-beam/bin/python -m pytest -q tests/test_prepare_beam.py tests/test_prepared.py

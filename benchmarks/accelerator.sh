#!/usr/bin/env bash
# On the accelerator machine: the carried wheels (.whl/) into /tmp/site, then the measurement.
set -euo pipefail; cd "$(dirname "$0")/.."; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. exec python3 benchmarks/accelerator.py "$@"

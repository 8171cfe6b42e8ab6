#!/usr/bin/env bash
# Set up the venv if needed and run the whole test suite (real Ray, real SeaweedFS S3 server).
# Extra arguments go to pytest, e.g. ops/test.sh -k spec
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
ops/setup.sh
exec .venv/bin/python -m pytest -q -ra "$@"

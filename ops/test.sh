#!/usr/bin/env bash
# Set up the venv if needed, run the static checks (lint-imports, ruff, mypy), then the whole test suite
# (real Ray, real SeaweedFS S3 server).
# Extra arguments go to pytest, e.g. ops/test.sh -k spec
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
ops/setup.sh
# Headless Chromium renders the evaluation report in one test (tests/test_report.py). Installed when
# we can (root + apt). Without it that test is skipped, with the reason in the summary, except in CI
# (CI=true), where a missing Chromium fails it.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[test] installing chromium for the report rendering test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[test] chromium could not be installed; the report rendering test will be skipped, or fail in CI" >&2
fi
# A throwaway PostgreSQL server is the production-like Iceberg catalog of one nightly test
# (tests/test_nightly.py); installed like Chromium, skipped without it except in CI.
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[test] installing postgresql for the nightly catalog test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
    || echo "[test] postgresql could not be installed; that test will be skipped, or fail in CI" >&2
fi
# Static checks before the tests, each failing the script on a finding (configured in pyproject.toml):
# import contracts (layers, no torch/Ray in spec parsing), lint, types.
echo "[test] lint-imports, ruff check, mypy" >&2
.venv/bin/lint-imports --no-logo
.venv/bin/ruff check pipelines tests ops
.venv/bin/mypy
exec .venv/bin/python -m pytest -q -ra --durations=12 "$@"

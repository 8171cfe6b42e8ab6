#!/usr/bin/env bash
# Set up the venv if needed and run the whole test suite (real Ray, real SeaweedFS S3 server).
# Extra arguments go to pytest, e.g. ops/test.sh -k spec
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
ops/setup.sh
# Headless Chromium renders the evaluation report in one test. Installed when we can (root + apt);
# without it that one test is skipped, with the reason in the summary.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[test] installing chromium for the report rendering test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[test] chromium could not be installed; the report rendering test will be skipped" >&2
fi
exec .venv/bin/python -m pytest -q -ra --durations=12 "$@"

#!/usr/bin/env bash
# Start / stop the local S3 object store (SeaweedFS on loopback, free ports) used by the demo.
# Usage: ops/objectstore.sh up|down|status
# State (data, log, endpoint, credentials) lives in .adpipe/objectstore/ (git-ignored); after
# `up`, `source .adpipe/objectstore/env` gives a shell the endpoint and credentials.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/ops/setup.sh"
exec "$root/.venv/bin/python" -m pipelines.objectstore "${1:-status}" --state-dir "$root/.adpipe/objectstore" \
  --bucket adpipe-demo "${@:2}"

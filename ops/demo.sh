#!/usr/bin/env bash
# The demo, from nothing: set up the venv if needed, start the local S3 object store if it is not
# running, and run jobs/demo.yaml on an embedded Ray. The object store keeps running afterwards
# (so you can read the data); stop it with: ops/objectstore.sh down
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
ops/setup.sh
ops/objectstore.sh up
# shellcheck disable=SC1091
source .adpipe/objectstore/env
exec .venv/bin/adpipe run jobs/demo.yaml "$@"

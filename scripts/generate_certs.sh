#!/usr/bin/env bash
# TLS certificates (CA + SuperLink certificate) and SuperNode authentication keys (EC P-384,
# OpenSSH format) for a Flower deployment of fedmm.  Same as `fedmm certs`; see docs/deployment.md,
# "Step by step across machines".
#   scripts/generate_certs.sh --out certificates --supernodes 5 --hosts superlink.example.org,10.0.0.5
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m fedmm.cli certs "$@"

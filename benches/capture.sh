#!/usr/bin/env bash
# Runs the activation-capture benchmark (see docs/calibration.md). Extra arguments go to cargo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec cargo bench -p kiln-pipeline --bench capture "$@"

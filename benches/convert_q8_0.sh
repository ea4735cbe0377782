#!/usr/bin/env bash
# Runs the Q8_0 conversion benchmark (see benches/README.md). Extra arguments go to cargo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec cargo bench -p kiln-pipeline --bench convert_q8_0 "$@"

#!/usr/bin/env bash
# The GPU check in one command, from anywhere: bash benchmarks/gpu_check.sh [--dry-run]
# (benchmarks/gpu_check.py says what it runs and writes; docs/kernels.md, "The GPU check").
# Installs nothing; runs ${PYTHON:-python3}, unbuffered.
exec "${PYTHON:-python3}" -u "$(dirname "$0")/gpu_check.py" "$@"

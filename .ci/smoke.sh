#!/usr/bin/env bash
# The whole pipeline on configs/smoke.yaml, in a scratch clone of the committed tree: every stage through
# `gmpipe pipeline` (Prefect + dvc repro), then a second run that must find everything up to date.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
git clone -q "$root" "$scratch/project"
cd "$scratch/project"
cp configs/smoke.yaml params.yaml
time gmpipe pipeline
dvc metrics show
gmpipe pipeline | tee "$scratch/second.log"
if grep -q "| ran |" "$scratch/second.log"; then
    echo "smoke: the second run re-ran a stage" >&2
    exit 1
fi
echo "smoke: ok"

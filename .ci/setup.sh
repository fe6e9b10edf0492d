#!/usr/bin/env bash
# Idempotent set-up: a virtual environment with torch installed first (so a CPU machine never downloads a
# multi-GB CUDA build), the project with its dev extra (which includes the pipeline extra: Prefect and DVC), DVC and
# Prefect kept inside the project, and the Fashion-MNIST data set from Debian when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    say "installing $TORCH_SPEC first"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "${PIP[@]}" "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
    else
        "${PIP[@]}" "$TORCH_SPEC"
    fi
fi

stamp="$VENV/.gmpipe-installed"
# hashed in Python, not with sha256sum, which macOS lacks
want="$("$VENV/bin/python" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing gmpipe and its dependencies"
    "${PIP[@]}" -e ".[dev]"
    echo "$want" > "$stamp"
fi

# The data: Debian's dataset-fashion-mnist, only when params.yaml reads Fashion-MNIST from its folder. `make test`
# skips this (GMPIPE_SETUP_DATA=no: the tests bring their own slice), and so does a params.yaml pointing elsewhere
# (an image folder, or the four idx files downloaded anywhere: what works without apt, e.g. on macOS).
data_path="$("$VENV/bin/python" -c '
from gmpipe.config.yaml_io import load
data = (load(open("params.yaml").read(), "params.yaml") or {}).get("data") or {}
print(data.get("path", "") if data.get("source", "fashion_mnist") == "fashion_mnist" else "")' 2>/dev/null || true)"
if [ "${GMPIPE_SETUP_DATA:-yes}" != no ] && [ "$data_path" = "$FASHION_MNIST_DIR" ] \
        && [ ! -f "$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=(); elif sudo -n true 2>/dev/null; then SUDO=(sudo); else SUDO=(none); fi
    if [ "${SUDO[0]:-}" = none ] || ! command -v apt-get >/dev/null; then
        say "Fashion-MNIST is missing and this user cannot install Debian packages. Run:"
        say "    sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
        say "(or put the four idx .gz files of the Fashion-MNIST release in a folder and set data.path in"
        say "params.yaml to it; make test needs none of this)"
        exit 1
    fi
    say "installing the Debian package dataset-fashion-mnist"
    "${SUDO[@]}" apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
        || { "${SUDO[@]}" apt-get update -qq && "${SUDO[@]}" apt-get install -y -qq dataset-fashion-mnist; }
fi

# Headless Chromium for the report's browser test (tests/stages/test_latent_stages.py opens reports/report.html), for
# `make test` only (GMPIPE_SETUP_BROWSER=yes; the demo does not need a browser):
# Debian's `chromium` package when it is missing, as root or with passwordless sudo; otherwise one line saying how.
if [ "${GMPIPE_SETUP_BROWSER:-no}" = yes ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=(); elif sudo -n true 2>/dev/null; then SUDO=(sudo); else SUDO=(none); fi
    if [ "${SUDO[0]:-}" = none ] || ! command -v apt-get >/dev/null; then
        say "chromium is missing (the report's browser test needs it); install it with your package manager:"
        say "    sudo apt-get update && sudo apt-get install -y chromium    (macOS: brew install --cask chromium)"
    else
        say "installing the Debian package chromium (headless browser for the report test)"
        "${SUDO[@]}" apt-get install -y -qq chromium >/dev/null 2>&1 \
            || { "${SUDO[@]}" apt-get update -qq && "${SUDO[@]}" apt-get install -y -qq chromium; }
    fi
fi

# DVC inside a fresh clone: site cache in the repo, no analytics (also in .dvc/config). The site cache path is
# absolute and per clone (.dvc/config.local): DVC resolves a relative one against the working directory, which
# `dvc exp run --queue` / `--temp` change to a temporary copy of the repo ("unable to open database file").
export DVC_NO_ANALYTICS=1
if ! "$VENV/bin/dvc" config --local core.site_cache_dir >/dev/null 2>&1; then
    "$VENV/bin/dvc" config --local core.site_cache_dir "$PWD/.dvc/site_cache"
fi
say "ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"

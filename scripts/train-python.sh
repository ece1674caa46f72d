#!/usr/bin/env bash
# The Python environment of federated training's example and references, target/py-train:
# numpy and safetensors (the client package in python/), scikit-learn (the digits data) and
# dp-accounting (the accountant's cross-check), pinned in scripts/reference/train-requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
py="$PWD/target/py-train/bin/python"
if ! "$py" -c "import numpy, safetensors, sklearn, dp_accounting" >/dev/null 2>&1; then
  if ! python3 -m venv target/py-train >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv target/py-train
  fi
  "$py" -m pip install --quiet -r scripts/reference/train-requirements.txt
fi

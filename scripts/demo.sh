#!/usr/bin/env bash
# The main job: a whole consortium on this machine (CA, coordinator, three site nodes as
# separate processes). Builds both binaries in release mode, then runs the demo; extra
# arguments go to `fedcurate-node consortium-demo` (e.g. --dir DIR --patients N, or --annotate to
# leave site-a's web annotator running with demo logins).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin fedcurate-node --bin fedcurate-coordinator
# --annotate leaves site-a's web annotator running: its viewer comes from npm.
for a in "$@"; do
    if [ "$a" = --annotate ]; then ./scripts/web-assets.sh; fi
done
# The training step's trainers are Python (numpy, safetensors, scikit-learn): their own
# environment in target/py-train. Without it the demo skips that step and says so.
if ./scripts/train-python.sh; then
    export FEDCURATE_TRAIN_PYTHON="$PWD/target/py-train/bin/python"
else
    echo "could not prepare the Python environment for the training step; the demo will skip it" >&2
fi
exec ./target/release/fedcurate-node consortium-demo "$@"

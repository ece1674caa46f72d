#!/usr/bin/env bash
# The main job: a whole consortium on this machine (CA, coordinator, three site nodes as
# separate processes). Builds both binaries in release mode, then runs the demo; extra
# arguments go to `fedcurate-node consortium-demo` (e.g. --dir DIR --patients N).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin fedcurate-node --bin fedcurate-coordinator
exec ./target/release/fedcurate-node consortium-demo "$@"

#!/usr/bin/env bash
# Install what the tests need, then run every test of the workspace.
# Used by developers (the README's second command) and by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v dcmdump >/dev/null 2>&1 || need_apt+=(dcmtk)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
command -v dcmdump >/dev/null 2>&1 || { echo "dcmdump (dcmtk) is required by the tests and could not be installed" >&2; exit 1; }

cargo test --workspace --all-targets --locked

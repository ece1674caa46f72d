#!/usr/bin/env bash
# Install the web annotator's viewer (NiiVue, pinned in web/package-lock.json) into web/node_modules.
# Node.js and npm come from Debian's packages; no install script of any package is run.
set -euo pipefail
cd "$(dirname "$0")/../web"
if ! command -v npm >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get install -y -q nodejs npm
    else
        sudo apt-get install -y -q nodejs npm
    fi
fi
if [ ! -f node_modules/@niivue/niivue/dist/index.js ] || ! cmp -s package-lock.json node_modules/.package-lock.json.src 2>/dev/null; then
    npm ci --ignore-scripts --no-audit --no-fund
    cp package-lock.json node_modules/.package-lock.json.src
fi
echo "viewer installed in $(pwd)"

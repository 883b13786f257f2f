#!/usr/bin/env bash
# Installs Debian's chromium for the viewer's browser test (never a browser build from elsewhere).
# Idempotent and quiet; exits 0 without installing when it cannot (not root, no apt-get), so callers
# decide whether a missing browser is fatal.
set -euo pipefail

BROWSER=/usr/bin/chromium
if [ -x "$BROWSER" ]; then
    echo "install_browser: $BROWSER already present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser: not root, cannot apt-get install chromium; install it yourself (apt-get install chromium)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no apt-get on this machine; install chromium at $BROWSER by hand"
    exit 0
fi
echo "install_browser: installing Debian chromium (a few minutes)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
if [ -x "$BROWSER" ]; then
    echo "install_browser: installed $BROWSER"
else
    echo "install_browser: apt-get finished but $BROWSER is missing" >&2
    exit 1
fi

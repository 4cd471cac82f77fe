#!/usr/bin/env bash
# Install Debian's chromium and chromium-driver for the web page's headless-browser test.
# Idempotent: does nothing when both are already installed. Needs root and apt-get.
set -euo pipefail

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
  echo "install_chromium: chromium and chromedriver already installed" >&2
  exit 0
fi
if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: chromium is missing and cannot be installed here (needs root and apt-get)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update >&2
apt-get install -y --no-install-recommends chromium chromium-driver >&2
echo "install_chromium: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)" >&2

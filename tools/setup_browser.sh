#!/usr/bin/env bash
# Chromium and chromedriver for the web demo's browser test (tests/tools/test_web_demo_browser.py)
# and tools/check_web_demo.py. Installs Debian's packages when they are missing and this runs as
# root with apt-get; otherwise says how to install them (the browser test then fails with the
# same hint). Idempotent: returns at once when both are there.
set -euo pipefail
if { [ -n "${CHROMIUM:-}" ] || command -v chromium >/dev/null; } && \
   { [ -n "${CHROMEDRIVER:-}" ] || command -v chromedriver >/dev/null; }; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup_browser] installing chromium and chromium-driver (apt-get, about a minute)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium chromium-driver >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
  exit 0
fi
echo "[setup_browser] Chromium or chromedriver is missing, so the web demo's browser test will fail." \
     "Install them with: sudo apt-get install chromium chromium-driver (Debian/Ubuntu), or set CHROMIUM" \
     "and CHROMEDRIVER to the browser and driver binaries." >&2

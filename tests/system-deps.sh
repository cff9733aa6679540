#!/usr/bin/env bash
# What some tests need beyond Python (CI runs this; so can you, as root on Debian/Ubuntu):
# Chromium (report and Prefect UI checks), buildah + debootstrap (the image build), and
# playwright-core for driving Chromium (npm, from tests/ui/package-lock.json). Without them those
# tests skip with a reason; under CI=true they fail instead.
set -euo pipefail
cd "$(dirname "$0")"
need=()
for pair in chromium:chromium buildah:buildah debootstrap:debootstrap node:nodejs npm:npm; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${need[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null
  else
    echo "missing ${need[*]}: install them with your package manager (root needed)" >&2
  fi
fi
if command -v npm >/dev/null && [ ! -d ui/node_modules/playwright-core ]; then
  (cd ui && npm ci --no-audit --no-fund --silent)
fi

#!/usr/bin/env bash
# Installs what the build and the tests need when it is missing; does nothing when all is there.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install Rust (https://rustup.rs) first" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
      rustup component add "$component"
    fi
  done
fi
if ! command -v make >/dev/null 2>&1 || ! command -v kill >/dev/null 2>&1; then
  apt_install=1
fi
if [ "${apt_install:-0}" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq make procps
fi

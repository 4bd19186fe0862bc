#!/usr/bin/env bash
# The project's test command: makes sure a Vulkan driver exists (software lavapipe when
# there is no GPU), fetches the cached real test assets, then runs the whole test suite
# with the Vulkan backend pinned (the real-model tests included), after checking the
# layering and clippy.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 || ! ldconfig -p | grep -q libvulkan.so.1; then
  echo "installing the Vulkan loader and Mesa's drivers (lavapipe)" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1 >&2
fi
export WGPU_BACKEND=vulkan
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
export LORAP_ASSETS="$(bash scripts/fetch-assets.sh | tail -n 1)"
# the layering of src/ (ARCHITECTURE.md) and clippy, then every test, the slow real-model ones included
bash scripts/check-layers.sh
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --release --all-targets --features real-model,scale-tests -- -D warnings
else
  echo "clippy is not installed: lint skipped" >&2
fi
cargo test --release --features real-model,scale-tests "$@"

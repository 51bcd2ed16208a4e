#!/usr/bin/env bash
# Configures and builds blockd with Ninja into ./build (BUILD_DIR overrides); any machine with the deps.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build}
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}
if [ ! -f "$build_dir/build.ninja" ]; then
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-RelWithDebInfo}" >/dev/null
fi
ninja -C "$build_dir" -j "$jobs" "$@"

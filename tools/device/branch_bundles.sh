#!/usr/bin/env bash
# Builds, here, what one GPU run needs to judge several branches against a base: a full
# bundle of BASE (device_bundle/base.tar.xz: executables and libraries) and a slim bundle of
# each BRANCH (device_bundle/<branch, / as ->.slim.tar.xz: the CUDA benchmark and tests, no
# libraries), each built in BUILD_DIR from a clean checkout of that commit. The working tree
# must be clean; it is left on the branch it was on.
#
#   tools/device/branch_bundles.sh BASE BRANCH...        (e.g. main next/a next/b)
#   device: bench/cuda/compare_branches                  (carry device_bundle)
#
# Environment: BUILD_DIR (default build, configured with CUDA).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ $# -lt 2 ]]; then
  echo "usage: tools/device/branch_bundles.sh BASE BRANCH..." >&2
  exit 2
fi
if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
  echo "branch_bundles.sh: the working tree has changes; commit or stash them first" >&2
  exit 2
fi
back=$(git symbolic-ref --quiet --short HEAD || git rev-parse HEAD)
trap 'git checkout -q "$back"' EXIT
base=$1
shift
rm -f device_bundle/base.tar.xz device_bundle/*.slim.tar.xz
git checkout -q "$base"
tools/device/make_gpu_bundle.sh "${BUILD_DIR:-build}" >/dev/null
mv device_bundle/lm2-gpu.tar.xz device_bundle/base.tar.xz
echo "base: $base ($(git rev-parse --short HEAD))"
for branch in "$@"; do
  git checkout -q "$branch"
  SLIM=1 tools/device/make_gpu_bundle.sh "${BUILD_DIR:-build}" >/dev/null
  mv device_bundle/lm2-gpu-slim.tar.xz "device_bundle/${branch//\//-}.slim.tar.xz"
  echo "slim: $branch ($(git rev-parse --short HEAD))"
done
du -ch device_bundle/*.tar.xz | tail -n 1

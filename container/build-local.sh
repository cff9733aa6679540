#!/usr/bin/env bash
# Build the pathflow image on a machine without a Docker engine or registry access, then run
# `pathflow local` inside it and check that the run completed.
#
#   container/build-local.sh [TAG]        (default localhost/pathflow:local; run as root)
#
# buildah (vfs storage, chroot isolation) builds ./Dockerfile on a Debian base made here with
# debootstrap (kept as localhost/pathflow-base:bookworm for later builds) and the CPU PyTorch wheel.
# Env: DEBIAN_MIRROR (default http://deb.debian.org/debian), TORCH_SPEC (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/pathflow:local}
BASE=localhost/pathflow-base:bookworm
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
B=(buildah --storage-driver vfs)
VERSION=$(sh container/version)
say() { printf '\n== %s\n' "$*"; }

for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install buildah debootstrap" >&2; exit 2; }
done

if ! "${B[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  say "base image $BASE: debootstrap Debian bookworm with python3"
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
    "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  ctr=$("${B[@]}" from scratch)
  mnt=$("${B[@]}" mount "$ctr")
  cp -a "$rootfs"/. "$mnt"/
  "${B[@]}" umount "$ctr"
  "${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
  "${B[@]}" commit --rm -q "$ctr" "$BASE" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
fi

say "PyTorch wheel for the image ($TORCH_SPEC) into container/wheels/"
ls container/wheels/torch-*.whl >/dev/null 2>&1 || pip download -q --no-deps -d container/wheels "$TORCH_SPEC"

say "build $TAG (version $VERSION)"
# pip in the build trusts what pip trusts here (this machine's CA bundle, mounted read-only, not copied)
ca=$(python3 -m pip config get global.cert 2>/dev/null || true)
ca=${ca:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
ca_args=()
[ -f "$ca" ] && ca_args=(--volume "$ca:/run/build-ca.crt:ro" --build-arg BUILD_CA_BUNDLE=/run/build-ca.crt)
t0=$SECONDS
"${B[@]}" bud --isolation chroot --layers=false -f Dockerfile "${ca_args[@]}" \
  --build-arg BASE_IMAGE="$BASE" --build-arg EXTRA_REQUIREMENTS="$TORCH_SPEC" --build-arg VERSION="$VERSION" \
  -t "$TAG" .
echo "built in $((SECONDS - t0)) s"
"${B[@]}" rmi --prune >/dev/null 2>&1 || true  # the image this tag had before

say "pathflow local inside $TAG"
store=$(mktemp -d)
chmod 0777 "$store"
ctr=$("${B[@]}" from "$TAG")
trap '"${B[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
"${B[@]}" run --isolation chroot -v "$store:/data/store" --env HF_HUB_OFFLINE=1 "$ctr" -- pathflow local
python3 - "$store" <<'PY'
import json, pathlib, sys
runs = sorted(pathlib.Path(sys.argv[1], "runs").glob("*/manifest.json"))
if len(runs) != 1:
    sys.exit(f"expected one run in the store, found {len(runs)}")
m = json.loads(runs[0].read_text())
if m["status"] != "complete" or "integrated/features.json" not in m["outputs"]:
    sys.exit(f"run {m['run_id']} is {m['status']}: {m.get('error')}")
print(f"run {m['run_id']} complete inside the image: {len(m['outputs'])} outputs")
PY
printf "image %s, version label %s\n" "$TAG" "$("${B[@]}" inspect --type image --format '{{index .OCIv1.Config.Labels "org.opencontainers.image.version"}}' "$TAG")"
echo "store: $store"

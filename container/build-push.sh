#!/bin/sh
# Build the worker image from ./Dockerfile as $PATHFLOW_IMAGE:<version> and push it: the image the GPU
# deployments in prefect.yaml run. Needs a Docker engine (CONTAINER_CLI=podman works too); PUSH=0 keeps
# the image local (a single GPU host whose docker pool runs it directly).
set -eu
cd "$(dirname "$0")/.."
cli=${CONTAINER_CLI:-docker}
version=$(sh container/version)
ref=$(sh container/image-ref)
echo "building $ref"
"$cli" build --platform linux/amd64 --build-arg VERSION="$version" -t "$ref" "$@" .
if [ "${PUSH:-1}" != 0 ]; then
  "$cli" push "$ref"
fi
echo "$ref"

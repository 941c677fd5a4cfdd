#!/usr/bin/env bash
# Build the test cluster's control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler from k8s.io/kubernetes, and an embedded etcd) and a kubectl of the same
# release into
# build/kube-<release>/, once: a folder whose stamp matches go.sum is reused. Go's own
# caches (GOCACHE, GOMODCACHE) make a rebuild after a go.sum change incremental.
#   usage: testcluster/build.sh            prints the folder holding the binaries
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
release="$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$here/go.mod" | head -1)"
out="$(cd "$here/.." && pwd)/build/kube-$release"
stamp="$(cat "$here/go.sum" "$here/go.mod" "$here/etcd/main.go" "$here/build.sh" | sha256sum | cut -c1-16)"
programs=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd)
if [[ -f "$out/.stamp" && "$(cat "$out/.stamp")" == "$stamp" ]]; then
  echo "$out"
  exit 0
fi
if ! command -v go > /dev/null; then
  echo "testcluster/build.sh: Go is needed to build the test cluster (https://go.dev/dl/)" >&2
  exit 2
fi
mkdir -p "$out"
rm -f "$out/.stamp"
cd "$here"
echo "building Kubernetes $release control plane and etcd into $out (cold: several minutes)" >&2
start=$SECONDS
# the release in the binaries, as an official build has it (kubectl and helm read it)
minor="$(echo "$release" | cut -d. -f2)"
version="-X k8s.io/component-base/version.gitVersion=$release"
version+=" -X k8s.io/component-base/version.gitMajor=1"
version+=" -X k8s.io/component-base/version.gitMinor=$minor"
version+=" -X k8s.io/component-base/version.gitTreeState=clean"
go build -trimpath -ldflags="-s -w $version" -o "$out/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubectl \
  ./etcd >&2
for p in "${programs[@]}"; do
  [[ -x "$out/$p" ]] || { echo "testcluster/build.sh: $p was not built" >&2; exit 1; }
done
echo "$stamp" > "$out/.stamp"
echo "built in $((SECONDS - start)) s" >&2
echo "$out"

#!/usr/bin/env bash
# Renders the walcache Kubernetes manifests (base and every overlay) and validates them:
#   1. `kubectl kustomize` builds each (kustomize v2.0.3 from kubectl 1.20 up to v5);
#   2. built-in kinds: kubernetes-validate --strict against Kubernetes $K8S_VERSION (unknown
#      fields, types, required fields); an object it has no schema for fails the check;
#   3. PodMonitors (a CRD kubernetes-validate only warns about): schemas/podmonitor.schema.json;
#   4. check_rendered.py: properties walcache needs (security context, probes, limits, the
#      producer's readiness with standby=ok, the TOML configuration's keys and mounted files,
#      cache.capacity vs the memory limit, references between the objects). Placeholder secrets
#      in an overlay are reported as warnings.
# Tools come from the environment, so an install script can point them at a venv:
#   KUBECTL=kubectl KUBERNETES_VALIDATE=kubernetes-validate PYTHON=python3 (PyYAML + jsonschema)
set -euo pipefail

KUBECTL=${KUBECTL:-kubectl}
KUBERNETES_VALIDATE=${KUBERNETES_VALIDATE:-kubernetes-validate}
PYTHON=${PYTHON:-python3}
K8S_VERSION=${K8S_VERSION:-1.30.0}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for tool in "$KUBECTL" "$KUBERNETES_VALIDATE" "$PYTHON"; do
  command -v "$tool" >/dev/null || { echo "check.sh: $tool not found (set KUBECTL, KUBERNETES_VALIDATE, PYTHON)" >&2; exit 2; }
done

kubectl_version=$("$KUBECTL" version --client 2>/dev/null | grep -o 'v[0-9]*\.[0-9]*\.[0-9]*' | head -n1 || true)
kustomize_version=$("$KUBECTL" version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p')
echo "kubectl ${kubectl_version:-?} (kustomize ${kustomize_version:-built in}), $("$KUBERNETES_VALIDATE" --version 2>&1 | sed 's/^/kubernetes-validate /'), $("$PYTHON" --version 2>&1)"

targets=(base)
for overlay in "$here"/overlays/*/; do
  targets+=("overlays/$(basename "$overlay")")
done

for target in "${targets[@]}"; do
  name=${target//\//-}
  rendered="$tmp/$name.yaml"
  echo "== $target"

  if ! "$KUBECTL" kustomize "$here/$target" >"$rendered" 2>"$tmp/$name.kustomize.err"; then
    cat "$tmp/$name.kustomize.err" >&2
    echo "FAIL $target: kubectl kustomize failed" >&2
    exit 1
  fi
  # kustomize v5 warns that `bases`/`patchesStrategicMerge` are deprecated: kept on purpose
  # for kustomize v2.0.3. Anything else it says is shown.
  deprecated=$(grep -c "is deprecated. Please use" "$tmp/$name.kustomize.err" || true)
  [ "$deprecated" -eq 0 ] || echo "kustomize: $deprecated deprecation warnings (bases/patchesStrategicMerge, kept for kustomize v2.0.3)"
  grep -v "is deprecated. Please use" "$tmp/$name.kustomize.err" | sed 's/^/kustomize: /' >&2 || true
  echo "rendered $(grep -c '^kind:' "$rendered") objects"

  "$PYTHON" "$here/check_rendered.py" split "$rendered" "$tmp/$name.builtin.yaml"
  if ! "$KUBERNETES_VALIDATE" --strict --quiet -k "$K8S_VERSION" "$tmp/$name.builtin.yaml" >"$tmp/$name.validate.out" 2>&1; then
    cat "$tmp/$name.validate.out" >&2
    echo "FAIL $target: kubernetes-validate --strict -k $K8S_VERSION" >&2
    exit 1
  fi
  if grep -q "Couldn't find schema" "$tmp/$name.validate.out"; then
    cat "$tmp/$name.validate.out" >&2
    echo "FAIL $target: kubernetes-validate has no schema for a kind above (a CRD? give it a JSON schema in check_rendered.py)" >&2
    exit 1
  fi
  cat "$tmp/$name.validate.out"
  echo "kubernetes-validate --strict -k $K8S_VERSION: built-in objects valid"

  production=()
  [ "$target" = base ] || production=(--production)
  if ! "$PYTHON" "$here/check_rendered.py" check "$rendered" "${production[@]}"; then
    echo "FAIL $target: check_rendered.py" >&2
    exit 1
  fi
done
echo "check.sh: all manifests render and validate"

#!/usr/bin/env bash
# Validates everything under deploy/ with real validators (make lint runs it; the tools come
# from deploy/local/install-tools.sh lint):
#   Dockerfile               hadolint
#   deploy/compose           docker-compose config (the Compose specification's JSON schema)
#   deploy/systemd           systemd-analyze verify + security (exposure at most 2.0)
#   deploy/observability     promtool check/test rules, dashboard PromQL, runbook anchors
#   deploy/kubernetes        kustomize render, kubernetes-validate --strict, PodMonitor schema
# That the dashboard's and alerts' metric names are exported, and that the daemon configs
# load, is checked against running daemons in make test (tests/tests/deploy.rs).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$root/deploy/local/install-tools.sh" path-lint-venv)
export PATH="$venv/bin:$PATH"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$root"

echo "== Dockerfile: hadolint $(hadolint --version | grep -o '[0-9][0-9.]*' | head -n1)"
hadolint Dockerfile
echo "ok"

echo
echo "== deploy/compose: docker-compose $(docker-compose version --short) config"
(cd deploy/compose && docker-compose -f compose.yaml config -q)
# Every file the compose file mounts or builds from exists (config -q does not look).
python3 - deploy/compose/compose.yaml <<'PY'
import os, re, sys
path = sys.argv[1]
base = os.path.dirname(path)
missing = []
for line in open(path):
    m = re.match(r"\s*-\s*(\.{1,2}/[^:\s]+):", line) or re.match(r"\s*(?:file|context):\s*(\.{1,2}/\S+)", line)
    if m and not os.path.exists(os.path.join(base, m.group(1))):
        missing.append(m.group(1))
if missing:
    sys.exit(f"compose.yaml refers to files that do not exist: {missing}")
PY
echo "ok"

echo
echo "== deploy/systemd: systemd-analyze $(systemd-analyze --version | head -n1 | cut -d' ' -f2)"
# A root of its own: the units' binaries (stand-ins) and the system's unit files.
mkdir -p "$tmp/root/etc/systemd/system" "$tmp/root/usr/local/bin" "$tmp/root/usr/lib/systemd"
cp -r /usr/lib/systemd/system "$tmp/root/usr/lib/systemd/"
units=()
for unit in deploy/systemd/*.service; do
  name=$(basename "$unit")
  cp "$unit" "$tmp/root/etc/systemd/system/"
  printf '#!/bin/sh\n' > "$tmp/root/usr/local/bin/${name%.service}"
  chmod +x "$tmp/root/usr/local/bin/${name%.service}"
  units+=("$name")
done
# verify exits 0 on some problems (unknown keys): any output is a failure.
out=$(systemd-analyze verify --man=no --root="$tmp/root" "${units[@]}" 2>&1) || { echo "$out"; exit 1; }
[ -z "$out" ] || { echo "$out"; echo "systemd-analyze verify reported the above"; exit 1; }
for name in "${units[@]}"; do
  systemd-analyze security --offline=yes --root="$tmp/root" --threshold=20 --no-pager "$name" | tail -n1
done
echo "ok"

echo
echo "== deploy/observability"
deploy/observability/check.sh

echo
echo "== deploy/kubernetes"
KUBERNETES_VALIDATE="$venv/bin/kubernetes-validate" PYTHON="$venv/bin/python" deploy/kubernetes/check.sh

echo
echo "deploy/check.sh: every deploy file validates"

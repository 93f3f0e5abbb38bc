#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages the test suite needs, only those that are missing:
#   bubblewrap         the grader's sandbox (bwrap)
#   postgresql         a throwaway PostgreSQL server for the gradebook tests (initdb, pg_ctl)
#   chromium           the browser tests of the lab
#   fonts-dejavu-core  fonts for the browser tests and plots
#   nodejs (with npm)  for configurable-http-proxy, the class hub's proxy (docs/classroom.md)
# then configurable-http-proxy from npm into build/node/ of this checkout (not globally).
# `--proxy-only` installs only the proxy (and nodejs if missing): what a class server needs.
# Idempotent: when everything is installed it changes nothing and needs no network or root.
# Uses sudo when not run as root. Python packages (the psycopg2-binary driver) come from
# pyproject.toml through `make`, not from here.
set -euo pipefail

PACKAGES=(bubblewrap postgresql chromium fonts-dejavu-core)
if [ "${1:-}" = "--proxy-only" ]; then
    PACKAGES=()
fi
command -v npm >/dev/null 2>&1 || PACKAGES+=(nodejs npm)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROXY_DIR="$REPO/build/node"
PROXY_BIN="$PROXY_DIR/node_modules/.bin/configurable-http-proxy"

install_proxy() {  # configurable-http-proxy, pinned; 5.x needs node >= 20, 4.6 runs on older ones
    local version=5.3.0
    [ "$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)" -ge 20 ] || version=4.6.3
    if [ -x "$PROXY_BIN" ] && [ "$("$PROXY_BIN" --version 2>/dev/null)" = "$version" ]; then
        echo "configurable-http-proxy $version: present ($PROXY_BIN)"
        return
    fi
    echo "installing configurable-http-proxy $version into $PROXY_DIR"
    npm install --prefix "$PROXY_DIR" --no-audit --no-fund --no-save --omit=dev --loglevel=error \
        "configurable-http-proxy@$version" \
        || die "'npm install configurable-http-proxy@$version' failed (no network to the npm registry?)."
    [ "$("$PROXY_BIN" --version 2>/dev/null)" = "$version" ] \
        || die "configurable-http-proxy was installed but $PROXY_BIN --version does not say $version."
}

die() {
    echo "" >&2
    echo "ERROR: install_system_deps.sh: $*" >&2
    echo "The tests need these Debian packages: ${PACKAGES[*]}." >&2
    echo "Install them yourself (e.g. 'sudo apt-get install -y ${PACKAGES[*]}') and run 'make test' again." >&2
    exit 1
}

installed() {  # is the Debian package $1 installed (not only known or half-configured)?
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = "installed" ]
}

command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    || die "this is not a Debian-based system (no dpkg-query/apt-get); install the equivalents of the packages with your system's package manager."

missing=()
for package in "${PACKAGES[@]}"; do
    installed "$package" || missing+=("$package")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "system packages: all present (${PACKAGES[*]})"
    install_proxy
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "missing packages (${missing[*]}) and not root, and sudo is not available."
    sudo -n true 2>/dev/null || echo "sudo will ask for your password to install: ${missing[*]}" >&2
    SUDO=(sudo DEBIAN_FRONTEND=noninteractive)
fi

echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
${SUDO[@]+"${SUDO[@]}"} apt-get update -q -o DPkg::Lock::Timeout=600 || die "'apt-get update' failed (no network, or a broken sources list?)."
${SUDO[@]+"${SUDO[@]}"} apt-get install -y -q -o DPkg::Lock::Timeout=600 "${missing[@]}" \
    || die "'apt-get install ${missing[*]}' failed (see apt's message above)."

still=()
for package in "${missing[@]}"; do
    installed "$package" || still+=("$package")
done
[ "${#still[@]}" -eq 0 ] || die "apt-get finished but these packages are still not installed: ${still[*]}."
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    || die "the postgresql package is installed but no /usr/lib/postgresql/<version>/bin/initdb was found."
echo "system packages: installed ${missing[*]}"
install_proxy

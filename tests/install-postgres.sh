#!/usr/bin/env bash
# Installs Debian's PostgreSQL server package if it is missing: the PostgreSQL tests start their own
# throwaway server from it (tests/postgres.py). Needs root or sudo; does nothing when it is installed.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install PostgreSQL's server (initdb, pg_ctl) with your package manager; the PostgreSQL tests skip without it" >&2
    exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null

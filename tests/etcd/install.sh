#!/usr/bin/env bash
# Puts a real etcd server (Debian's etcd-server 3.4.x) at target/etcd/usr/bin/etcd
# for the replicated-store tests. Unpacked with `apt-get download` + `dpkg -x`:
# installing the package would start a system service.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=target/etcd
if [ -x "$dest/usr/bin/etcd" ]; then
  exit 0
fi
mkdir -p "$dest"
cd "$dest"
if ! apt-get download etcd-server >/dev/null 2>&1; then
  apt-get update -qq
  apt-get download etcd-server
fi
dpkg -x etcd-server_*.deb .
test -x usr/bin/etcd
# Not `| head -1`: head exits after one line, etcd then writes into a closed
# pipe, and under pipefail the SIGPIPE (exit 141) failed a CI run.
version=$(./usr/bin/etcd --version)
echo "${version%%$'\n'*}"

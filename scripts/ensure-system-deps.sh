#!/usr/bin/env bash
# Make sure the system programs the tests need exist: OpenSSH's sshd, redis-server, rsync.
# Installs them with apt-get when missing and running as root; otherwise names the command.
set -euo pipefail
missing=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
command -v git >/dev/null 2>&1 || missing+=(git)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The package may start a system sshd/redis on their standard ports; tests never use them.
else
    echo "missing system packages; run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi

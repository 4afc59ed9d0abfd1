#!/bin/bash
# Installs the real NBD clients and peers the tests drive (qemu-io/qemu-img, nbdinfo/nbdcopy, fio, nbdkit) with
# apt-get when they are missing. Needs root; otherwise it says what is missing and the tests that need them fail
# with that message. The real-kernel VM has its own installer: test/kernel/setup.sh.
set -euo pipefail
missing=()
for pair in qemu-io:qemu-utils qemu-img:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin fio:fio nbdkit:nbdkit; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair##*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if [ "$(id -u)" != 0 ]; then
  echo "test tools missing: $pkgs(run as root: apt-get install $pkgs)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq $pkgs >/dev/null
echo "installed: $pkgs" >&2

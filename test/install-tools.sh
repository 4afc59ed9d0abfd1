#!/bin/bash
# Installs the real NBD clients and peers the tests drive (qemu-io/qemu-img, nbdinfo/nbdcopy, fio, nbdkit) with
# apt-get when they are missing. Needs root; otherwise it says what is missing and the tests that need them fail
# with that message. The real-kernel VM has its own installer: test/kernel/setup.sh.
set -euo pipefail
missing=()
for pair in qemu-io:qemu-utils qemu-img:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin fio:fio nbdkit:nbdkit; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair##*:}")
done
# mdadm for `mdadm -X` (test/dirty-logs/mdadm-interop.test.ts), without the mail server Debian recommends with it.
norec=()
command -v mdadm >/dev/null || [ -x /sbin/mdadm ] || norec+=(mdadm)
[ ${#missing[@]} -eq 0 ] && [ ${#norec[@]} -eq 0 ] && exit 0
pkgs=$(printf '%s\n' "${missing[@]}" "${norec[@]}" | sort -u | tr '\n' ' ')
if [ "$(id -u)" != 0 ]; then
  echo "test tools missing: $pkgs(run as root: apt-get install $pkgs)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
[ ${#missing[@]} -eq 0 ] || apt-get install -y -qq "${missing[@]}" >/dev/null
[ ${#norec[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${norec[@]}" >/dev/null
echo "installed: $pkgs" >&2

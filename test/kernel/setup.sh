#!/bin/bash
# Prepares a real Linux kernel (Debian 12's 6.1) with device-mapper, md, dmsetup and mdadm for run.sh.
# Installs qemu-system-x86 and cpio with apt-get (needs root) and downloads the Debian packages once into
# $DMSTATE_KVM_DIR (default ~/.cache/dmstate-kernel-vm). Idempotent: exits at once when everything is there.
set -euo pipefail
KVM_DIR=${DMSTATE_KVM_DIR:-$HOME/.cache/dmstate-kernel-vm}
if [ -x "$KVM_DIR/x/sbin/dmsetup" ] && ls "$KVM_DIR"/x/boot/vmlinuz-* >/dev/null 2>&1 \
   && command -v qemu-system-x86_64 >/dev/null && command -v cpio >/dev/null; then exit 0; fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v cpio >/dev/null; then
  apt-get update -qq && apt-get install -y -qq qemu-system-x86 cpio >/dev/null
fi
mkdir -p "$KVM_DIR/debs" "$KVM_DIR/x"
cd "$KVM_DIR/debs"
if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then apt-get update -qq; fi
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
apt-get download "$KPKG" busybox-static dmsetup libdevmapper1.02.1 mdadm >/dev/null 2>&1
for f in *.deb; do dpkg -x "$f" "$KVM_DIR/x"; done
echo "kernel-vm ready in $KVM_DIR" >&2

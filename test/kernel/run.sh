#!/bin/bash
# Boots Debian's Linux kernel under qemu (software emulation) with each DISK (a raw image file) as /dev/vda,
# /dev/vdb, ..., runs JOB (a shell script; busybox, dmsetup and mdadm available, dm and md modules loaded) and
# prints its output between '=== JOB START' and '=== JOB END rc=N'. What the guest writes lands in the images.
# usage: run.sh JOB.sh [DISK...]   env: DMSTATE_KVM_DIR, VM_TIMEOUT (s, default 300), VM_MEM (MiB, default 512)
# Written on the model of the workplace's kernel-vm tool; the project carries its own copy so a clone needs nothing else.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
KVM_DIR=${DMSTATE_KVM_DIR:-$HOME/.cache/dmstate-kernel-vm}
"$HERE/setup.sh"
X=$KVM_DIR/x
JOB=$1; shift
R=$(mktemp -d); INITRD=$(mktemp --suffix=.cpio.gz)
trap 'rm -rf "$R" "$INITRD"' EXIT
mkdir -p $R/{bin,sbin,proc,sys,dev,tmp,lib/modules,lib64,lib/x86_64-linux-gnu,mnt}
cp $X/bin/busybox $R/bin/busybox
for a in $($X/bin/busybox --list); do [ -e $R/bin/$a ] || ln -s busybox $R/bin/$a; done
cp $X/sbin/dmsetup $X/sbin/mdadm $R/sbin/
for lib in $( (LD_LIBRARY_PATH=$X/lib/x86_64-linux-gnu ldd $X/sbin/dmsetup; ldd $X/sbin/mdadm) | grep -o '/[^ ]*\.so[^ ]*' | sort -u); do
  cp -L "$lib" "$R$lib" 2>/dev/null || cp -L "$lib" $R/lib/x86_64-linux-gnu/
done
K=$(ls $X/lib/modules)
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk dm-mod dm-bufio dm-snapshot dm-log dm-region-hash dm-mirror dm-log-writes dm-flakey dm-zero dm-delay md-mod raid1 loop; do
  f=$(find $X/lib/modules/$K -name "$m.ko" | head -1); [ -n "$f" ] || continue
  cp "$f" $R/lib/modules/; echo $m >> $R/lib/modules/order
done
cp "$JOB" $R/job.sh
cat > $R/init <<'INIT'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko 2>/dev/null; done
mkdir -p /dev/mapper; export DM_DISABLE_UDEV=1
echo "=== JOB START"
sh /job.sh 2>&1; rc=$?
sync
echo "=== JOB END rc=$rc"
poweroff -f
INIT
chmod +x $R/init
(cd $R && find . | cpio -o -H newc 2>/dev/null | gzip -1) > $INITRD
DRIVES=()
for d in "$@"; do DRIVES+=(-drive "file=$d,format=raw,if=virtio,cache=writeback"); done
timeout ${VM_TIMEOUT:-300} qemu-system-x86_64 -accel tcg -m ${VM_MEM:-512} -smp 2 -nographic -no-reboot \
  -kernel $(ls $X/boot/vmlinuz-* | head -1) -initrd $INITRD -append "console=ttyS0 quiet panic=-1" "${DRIVES[@]}" \
  </dev/null | tr -d '\r' | sed -n 's/.*\(=== JOB START\)/\1/; /=== JOB START/,/=== JOB END/p'

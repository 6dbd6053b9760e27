#!/usr/bin/env bash
# Provides the kernel that the VM tests (livepatch, BPF trampolines) boot under qemu, and the
# matching headers to build out-of-tree modules against it.
#
# The host kernel of the reference machines has no module loading and no livepatch, so those
# tests boot Debian 12's own kernel (linux-image-amd64, 6.1.x: LIVEPATCH=y, unsigned modules
# accepted, BPF trampolines allowed). The image package is NOT installed on the host: installing
# it pulls initramfs-tools and upgrades systemd/udev. `apt-get download` + `dpkg-deb -x` gives
# the vmlinuz without side effects. The headers package is installed (it only adds files under
# /usr/src and /lib/modules/VER/build).
#
# The ABI version (the N in 6.1.0-N-amd64) is read at run time from the metapackages, so image
# and headers always match.
#
# Layout of the cache (read by internal/vmtest.FindKernel):
#   CACHE/RELEASE/vmlinuz   the kernel image
#   CACHE/RELEASE/config    its .config
#   CACHE/current           symlink to RELEASE
# Usage: scripts/vm-kernel.sh [CACHE]   (default $HOT_VM_KERNEL_CACHE or /var/cache/hot/vm-kernel)
# Idempotent: does nothing when the cache and headers for the current ABI are present.
set -euo pipefail

cache=${1:-${HOT_VM_KERNEL_CACHE:-/var/cache/hot/vm-kernel}}
export DEBIAN_FRONTEND=noninteractive

# dep_of META: the versioned package the metapackage META depends on, minus its prefix.
dep_of() {
	apt-cache depends "$1" 2>/dev/null | awk -v p="$2" '$1 == "Depends:" && index($2, p) == 1 { print substr($2, length(p) + 1); exit }'
}

image_rel=$(dep_of linux-image-amd64 linux-image-)
headers_rel=$(dep_of linux-headers-amd64 linux-headers-)
if [ -z "$image_rel" ] || [ -z "$headers_rel" ]; then
	echo "vm-kernel: apt does not know linux-image-amd64/linux-headers-amd64 yet; running apt-get update"
	apt-get -q update
	image_rel=$(dep_of linux-image-amd64 linux-image-)
	headers_rel=$(dep_of linux-headers-amd64 linux-headers-)
fi
if [ -z "$image_rel" ] || [ "$image_rel" != "$headers_rel" ]; then
	echo "vm-kernel: linux-image-amd64 wants '${image_rel}' but linux-headers-amd64 wants '${headers_rel}'; run apt-get update and retry" >&2
	exit 1
fi
rel=$image_rel

# Headers: /lib/modules/$rel/build for `make -C ... M=DIR`.
if ! dpkg-query -W -f='${Status}' "linux-headers-$rel" 2>/dev/null | grep -q 'install ok installed'; then
	echo "vm-kernel: installing linux-headers-$rel"
	apt-get -q install -y --no-install-recommends "linux-headers-$rel"
fi
if [ ! -e "/lib/modules/$rel/build/Makefile" ]; then
	echo "vm-kernel: /lib/modules/$rel/build/Makefile missing after installing linux-headers-$rel" >&2
	exit 1
fi

# Image: unpacked into the cache, never installed.
dir="$cache/$rel"
if [ ! -s "$dir/vmlinuz" ]; then
	work=$(mktemp -d)
	chmod 755 "$work" # apt-get download drops to the _apt user
	trap 'rm -rf "$work"' EXIT
	echo "vm-kernel: downloading linux-image-$rel (unpacked into $dir, not installed)"
	(cd "$work" && apt-get -q download "linux-image-$rel")
	dpkg-deb -x "$work"/linux-image-"$rel"_*.deb "$work/x"
	mkdir -p "$dir"
	cp "$work/x/boot/config-$rel" "$dir/config.new"
	cp "$work/x/boot/vmlinuz-$rel" "$dir/vmlinuz.new"
	mv "$dir/config.new" "$dir/config"
	mv "$dir/vmlinuz.new" "$dir/vmlinuz" # last: its presence marks a complete entry
fi
grep -q '^CONFIG_LIVEPATCH=y' "$dir/config" || echo "vm-kernel: warning: $rel has no CONFIG_LIVEPATCH" >&2
ln -sfn "$rel" "$cache/current"
echo "vm-kernel: $rel ready: $dir/vmlinuz, headers in /lib/modules/$rel/build"

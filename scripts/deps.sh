#!/usr/bin/env bash
# Installs everything hot and its tests need on a Debian/Ubuntu machine (run as root).
# Idempotent: safe to run again. Used by `make deps` and by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
	echo "deps: run as root (hot manages namespaces, cgroups, mounts and CRIU)" >&2
	exit 1
fi

# Debian packages. One line per purpose so it is clear why each is here.
pkgs=(
	ca-certificates git make gcc libc6-dev pkg-config curl  # build hot; gcc/make also build the VM tests' kernel modules
	iproute2 nftables iptables procps psmisc kmod      # container networking, host inspection
	podman skopeo umoci                                 # peers and image producers for the tests
	runc                                                # peer for checkpoint/restore benchmarks
	util-linux e2fsprogs xz-utils zstd cpio             # mounts, archives
	qemu-system-x86 busybox-static                      # VM tests (livepatch, BPF): qemu TCG boot of a busybox initramfs; cowfs podman build test runs the static busybox
)
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "deps: installing ${missing[*]}"
	apt-get -q update
	apt-get -q install -y --no-install-recommends "${missing[@]}"
fi

# The VM tests' kernel: Debian 12's own linux-image unpacked into /var/cache/hot/vm-kernel (not
# installed) and the matching linux-headers package (installed) for building test modules.
scripts/vm-kernel.sh

# Go toolchain: go.mod names the version; GOTOOLCHAIN=auto fetches it from the module proxy if older.
if ! command -v go >/dev/null; then
	if [ -x /usr/local/go/bin/go ]; then
		export PATH=/usr/local/go/bin:$PATH
	else
		echo "deps: installing Debian's golang-go; go.mod's toolchain is then fetched through the Go module proxy"
		apt-get -q install -y --no-install-recommends golang-go
	fi
fi

# CRIU >= 4.2 in a private prefix (Debian 12's 3.17 cannot checkpoint on current kernels).
scripts/install-criu.sh

# Go modules, so that tests do not race to download them.
go mod download
echo "deps: done"

#!/usr/bin/env bash
# Installs CRIU >= 4.2 into a private prefix without touching the system's libraries.
#
# Debian 12 ships criu 3.17, which cannot work on kernels >= 6.13 (vDSO layout) and 4.1 cannot
# dump inet sockets on kernels >= 6.16 (SO_PASSCRED). Debian's newer suite ships 4.2.1, but its
# packages need a newer glibc than Debian 12 has. We therefore download criu and its library
# closure from that suite into a private apt state, unpack them with `dpkg -x` into PREFIX, and
# run criu through the prefix's own dynamic loader via a wrapper script at PREFIX/bin/criu.
# hot finds that wrapper automatically (see criubin.PrivatePath).
#
# Usage: scripts/install-criu.sh [PREFIX]   (default /usr/local/lib/hot/criu)
# Environment: CRIU_SUITE (default forky), FORCE=1 to reinstall.
set -euo pipefail

prefix=${1:-/usr/local/lib/hot/criu}
suite=${CRIU_SUITE:-forky}
min_major=4 min_minor=2

version_ok() { # $1 = criu binary; true when it runs and reports >= 4.2
	local v
	v=$("$1" --version 2>/dev/null | sed -n 's/^Version: *//p') || return 1
	[ -n "$v" ] || return 1
	local major=${v%%.*} rest=${v#*.}
	local minor=${rest%%.*}
	[ "$major" -gt "$min_major" ] || { [ "$major" -eq "$min_major" ] && [ "$minor" -ge "$min_minor" ]; }
}

if [ "${FORCE:-0}" != 1 ]; then
	if [ -x "$prefix/bin/criu" ] && version_ok "$prefix/bin/criu"; then
		echo "criu: $("$prefix/bin/criu" --version | head -1) already in $prefix"
		exit 0
	fi
	if command -v criu >/dev/null && version_ok "$(command -v criu)"; then
		echo "criu: system criu $(criu --version | head -1) is recent enough"
		exit 0
	fi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" >"$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
	-o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Dir::State::status=/dev/null
	-o APT::Sandbox::User=root -o Acquire::Retries=3
	# Mirrors and snapshots may serve a Release file past its Valid-Until date; signatures are
	# still checked against Debian's keyring.
	-o Acquire::Check-Valid-Until=false -o Acquire::Check-Date=false)

echo "criu: fetching package lists of Debian $suite (private apt state, the system is not changed)"
apt-get "${apt_opts[@]}" -q update >"$work/update.log" 2>&1 || { cat "$work/update.log"; exit 1; }

# The runtime closure of criu in that suite, minus packages that are only metadata.
mapfile -t pkgs < <(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
	--no-conflicts --no-breaks --no-replaces --no-enhances --no-pre-depends criu |
	grep -v '^ ' | grep -v '^<' | grep -vE '^(gcc-[0-9]+-base|libc-gconv-modules-extra)$' | sort -u)
echo "criu: downloading ${pkgs[*]}"
(cd "$work/debs" && apt-get "${apt_opts[@]}" -q download "${pkgs[@]}" >"$work/download.log" 2>&1) ||
	{ cat "$work/download.log"; exit 1; }

stage="$prefix.new"
rm -rf "$stage"
mkdir -p "$stage"
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$stage"; done

libdir="$stage/usr/lib/x86_64-linux-gnu"
[ -x "$libdir/ld-linux-x86-64.so.2" ] || { echo "criu: no dynamic loader in the unpacked packages" >&2; exit 1; }
[ -x "$stage/usr/sbin/criu" ] || { echo "criu: no criu binary in the unpacked packages" >&2; exit 1; }
mkdir -p "$stage/bin"
cat >"$stage/bin/criu" <<WRAP
#!/bin/sh
# Runs CRIU from its private prefix with that prefix's own glibc (installed by hot's scripts/install-criu.sh).
exec "$prefix/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$prefix/usr/lib/x86_64-linux-gnu" "$prefix/usr/sbin/criu" "\$@"
WRAP
chmod 755 "$stage/bin/criu"

rm -rf "$prefix.old"
[ -e "$prefix" ] && mv "$prefix" "$prefix.old"
mv "$stage" "$prefix"
rm -rf "$prefix.old"

version_ok "$prefix/bin/criu" || { echo "criu: installed binary does not report >= 4.2:" >&2; "$prefix/bin/criu" --version >&2; exit 1; }
echo "criu: installed $("$prefix/bin/criu" --version | head -1) into $prefix"
# Informational: `hot doctor` reports the outcome of `criu check` with the reason and the fix.
echo "criu: criu check says: $("$prefix/bin/criu" check 2>&1 | tail -1)"

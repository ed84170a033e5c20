#!/usr/bin/env bash
# Builds, from Debian's packages only, a root filesystem equivalent to the registry's python:3.11-slim-bookworm
# for the project's Dockerfiles, and writes it as a tar file (image.py imports it under that name):
#   base-rootfs.sh OUTPUT.tar MIRROR
# Debian bookworm (minbase) with its python3 (3.11) and pip usable as in the official image: `python`, `python3`,
# `pip` on PATH and `pip install` allowed as root (no EXTERNALLY-MANAGED marker), ca-certificates and netbase.
# Like Debian's own container images it keeps no apt lists, no .deb cache, no documentation, man pages or
# translations (a dpkg filter keeps later installs from adding them), and never starts services (policy-rc.d).
# apt inside the image uses MIRROR, the Debian mirror this machine's apt uses.
# This file's content is part of the cache key of the base: any change here builds a new base.
set -euo pipefail

output=${1:?usage: base-rootfs.sh OUTPUT.tar MIRROR}
mirror=${2:?usage: base-rootfs.sh OUTPUT.tar MIRROR}
suite=bookworm
packages=python3,python3-pip,python-is-python3,ca-certificates,netbase

work=$(mktemp -d "${TMPDIR:-/tmp}/runbook-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/rootfs

debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 20 "$work/debootstrap.log" >&2
  echo "base-rootfs: debootstrap of $suite from $mirror failed (log above)" >&2
  exit 1
}

# apt sources as Debian's images have them (deb822), on the same mirror; security updates from its
# debian-security beside it.
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

cat >"$root/etc/dpkg/dpkg.cfg.d/runbook-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
cat >"$root/etc/apt/apt.conf.d/runbook-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
EOF
printf '#!/bin/sh\n# no service starts inside an image build\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"

# pip as in the official image: installs as root are allowed (Debian's pip puts them under /usr/local).
rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
ln -sf pip3 "$root/usr/bin/pip"

# What the files above leave out of the packages already installed, and what only the bootstrap needed.
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/var/log/* "$root"/tmp/* "$root"/root/.cache
# The container runtime provides these per container.
: >"$root/etc/resolv.conf"
: >"$root/etc/hostname"
: >"$root/etc/machine-id"

tar --numeric-owner --xattrs -C "$root" -cf "$output.partial" .
mv "$output.partial" "$output"

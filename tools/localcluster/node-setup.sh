#!/usr/bin/env bash
# Installs, idempotently, the Debian packages the real node of localcluster.py needs beside the binaries it
# builds itself: runc (the OCI runtime containerd starts), iptables and ipset (kube-proxy's Service rules
# and kube-router's NetworkPolicy rules), conntrack (kube-proxy clears UDP flows of removed endpoints).
set -euo pipefail

need=()
command -v runc >/dev/null || need+=(runc)
command -v iptables-restore >/dev/null || need+=(iptables)
command -v ipset >/dev/null || need+=(ipset)
command -v conntrack >/dev/null || need+=(conntrack)
if [ ${#need[@]} -gt 0 ]; then
  echo "node-setup: installing Debian packages: ${need[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

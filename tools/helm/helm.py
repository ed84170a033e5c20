#!/usr/bin/env python3
"""Build the helm CLI from its Go module (go.mod beside this file pins the version), cached like the
local control plane's binaries: ``${RUNBOOK_CACHE_DIR:-~/.cache/runbook-operator}/helm/bin-<hash>/helm``,
where the hash is over go.mod and go.sum, so a version change builds afresh and clones share the binary.

CLI::

    python tools/helm/helm.py build     # prints the path of the helm binary (builds it when missing)
    python tools/helm/helm.py path      # prints where the binary is or will be, without building
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "localcluster"))

import localcluster  # noqa: E402 - one Go lookup for every tool the project builds

BUILD_INPUTS = (HERE / "go.mod", HERE / "go.sum")
PACKAGE = "helm.sh/helm/v3/cmd/helm"


class HelmBuildError(RuntimeError):
    """helm could not be built; the message says why."""


def log(message: str) -> None:
    print(f"[helm] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = os.environ.get("RUNBOOK_CACHE_DIR") or str(Path.home() / ".cache" / "runbook-operator")
    return Path(base) / "helm"


def helm_version() -> str:
    match = re.search(r"helm\.sh/helm/v3\s+(v\d+\.\d+\.\d+)", (HERE / "go.mod").read_text())
    if match is None:
        raise HelmBuildError(f"{HERE / 'go.mod'} does not require helm.sh/helm/v3")
    return match.group(1)


def release_ldflags(version: str) -> str:
    """The -X flags helm's own Makefile sets for a release: its version (`helm version` would say v3.x
    otherwise) and the Kubernetes version that `helm lint` and `.Capabilities` assume, from client-go."""
    match = re.search(r"k8s\.io/client-go\s+v0\.(\d+)\.\d+", (HERE / "go.mod").read_text())
    if match is None:
        raise HelmBuildError(f"{HERE / 'go.mod'} does not require k8s.io/client-go v0.N.M")
    flags = ["-s", "-w", f"-X helm.sh/helm/v3/internal/version.version={version}"]
    flags += ["-X helm.sh/helm/v3/internal/version.gitTreeState=clean"]
    for package in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        flags += [f"-X {package}.k8sVersionMajor=1", f"-X {package}.k8sVersionMinor={match.group(1)}"]
    return " ".join(flags)


def binary_path() -> Path:
    digest = hashlib.sha256()
    for path in BUILD_INPUTS:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return cache_root() / f"bin-{digest.hexdigest()[:12]}" / "helm"


def build() -> Path:
    """The helm binary for the pinned version, built (about 2 minutes on 2 cores) unless cached."""
    binary = binary_path()
    if binary.is_file():
        return binary
    cache_root().mkdir(parents=True, exist_ok=True)
    with (cache_root() / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building the same binary
        if binary.is_file():
            return binary
        try:
            go = localcluster.find_go()
        except localcluster.LocalClusterError as error:
            raise HelmBuildError(f"helm is built from its Go module {PACKAGE}: {error}") from error
        version = helm_version()
        partial = binary.parent.with_name(binary.parent.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        ldflags = release_ldflags(version)
        log(f"building helm {version} into {binary.parent}")
        started = time.monotonic()
        result = subprocess.run(
            [go, "build", "-p", "2", "-trimpath", f"-ldflags={ldflags}", "-o", partial / "helm", PACKAGE],
            cwd=HERE,
            env={**os.environ, "CGO_ENABLED": "0"},
            check=False,
        )
        if result.returncode != 0:
            raise HelmBuildError(f"building helm from {PACKAGE} failed (exit {result.returncode})")
        shutil.rmtree(binary.parent, ignore_errors=True)
        partial.rename(binary.parent)
        log(f"built helm {version} in {time.monotonic() - started:.0f}s")
    return binary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "path"])
    args = parser.parse_args(argv)
    try:
        print(build() if args.command == "build" else binary_path())
    except HelmBuildError as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Build the project's container images with Docker: the operator/agent image from the repository's
Dockerfile, and the e2e tier's PostgreSQL, Redis and S3 API server images from Dockerfiles beside this file.

All of them start ``FROM python:3.11-slim-bookworm``. When no such image is present and the registry cannot
be reached, ``base-rootfs.sh`` builds an equivalent one from Debian's packages (debootstrap) and it is
imported under that same name, so the Dockerfile users build is the one built here.

The builder is a Docker daemon: the one running, else Debian's ``docker.io`` (installed when missing, with
``debootstrap``), started here with its own containerd on a private socket, the overlay2 driver, no iptables
rules and no bridge: builds and containers use the host's network, so nothing here touches the rules that the
local cluster's node and NetworkPolicy controller own. Builds use BuildKit (Debian's docker CLI has it built in).
HTTPS from inside a build (pip) trusts this machine's CA bundle, passed as the build secret ``ca-bundle``
(never part of a layer); apt inside a build uses the Debian mirror this machine's apt uses, and its proxy if
it has one (build args ``http_proxy``/``https_proxy``, which Docker keeps out of the image's history).

Cache, in ``${RUNBOOK_CACHE_DIR:-~/.cache/runbook-operator}/image/``, each entry keyed by a hash of its inputs:

- ``base-<key>/rootfs.tar``: the debootstrapped base (key: base-rootfs.sh and the mirror);
- ``tars/<name>-<key>.tar``: each image exported with ``docker save`` (a docker-archive that
  ``ctr images import`` reads); key: the image's Dockerfile and build context, and the base image's ID.
  An image whose label ``dev.runbook.inputs`` matches the key is not rebuilt.

CLI::

    python tools/image/image.py base      # the base image (pull, or build from Debian) and its ID
    python tools/image/image.py build     # the operator image; prints its name, size and tar
    python tools/image/image.py e2e       # the e2e images (postgres, redis, s3)
    python tools/image/image.py tars      # builds all; prints {image: tar path} as JSON
    python tools/image/image.py daemon    # starts the Docker daemon if none is running
    python tools/image/image.py stop      # stops the dockerd and containerd that ``daemon`` started
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
BASE_IMAGE = "python:3.11-slim-bookworm"
BASE_SCRIPT = HERE / "base-rootfs.sh"
LABEL = "dev.runbook.inputs"
DEBIAN_PACKAGES = {"dockerd": "docker.io", "containerd": "containerd", "debootstrap": "debootstrap"}
# The Docker daemon this module starts when none runs: its own containerd (another containerd on the machine's
# default socket, e.g. the local cluster node's, is left alone) and its state under RUN_DIR.
RUN_DIR = Path("/run/runbook-image")
DOCKER_HOST_SOCKET = Path("/var/run/docker.sock")
PULL_TIMEOUT = 60.0


class ImageError(RuntimeError):
    """An image could not be built or the builder could not start; the message says why."""


def log(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = os.environ.get("RUNBOOK_CACHE_DIR") or str(Path.home() / ".cache" / "runbook-operator")
    return Path(base) / "image"


def operator_image() -> str:
    """The operator's own default agent image: the name this build gives the Dockerfile's image."""
    sys.path.insert(0, str(REPO_ROOT / "operator"))
    from runbook_operator.settings import Settings

    default = Settings.model_fields["agent_image"].default
    assert isinstance(default, str)
    return default


@dataclass(frozen=True)
class Spec:
    """One image: its name, Dockerfile, build context and the files of that context it is built from."""

    name: str
    dockerfile: Path
    context: Path
    inputs: tuple[Path, ...]

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.name.rsplit("/", 1)[-1])


def operator_spec() -> Spec:
    tracked = [REPO_ROOT / "pyproject.toml", REPO_ROOT / "README.md", REPO_ROOT / ".dockerignore"]
    tracked += sorted(
        path
        for path in (REPO_ROOT / "operator").rglob("*")
        if path.is_file() and not any(part == "__pycache__" or part.endswith(".egg-info") for part in path.parts)
    )
    return Spec(operator_image(), REPO_ROOT / "Dockerfile", REPO_ROOT, (REPO_ROOT / "Dockerfile", *tracked))


def e2e_specs() -> list[Spec]:
    """The e2e tier's servers (tools/image/Dockerfile.<name>, context tools/image/e2e/)."""
    context = HERE / "e2e"
    files = tuple(sorted(p for p in context.rglob("*") if p.is_file()))
    dockerfiles = {name: HERE / f"Dockerfile.{name}" for name in ("postgres", "redis", "s3")}
    return [
        Spec(f"runbook-e2e/{name}:bookworm", dockerfile, context, (dockerfile, *files))
        for name, dockerfile in dockerfiles.items()
    ]


def digest_of(paths: Iterator[Path] | tuple[Path, ...], *extra: str) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    for value in extra:
        digest.update(value.encode() + b"\0")
    return digest.hexdigest()[:12]


# ------------------------------------------------------------------------------------------ the machine


def run(
    args: list[str], *, timeout: float | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=timeout, env=env)


def install_debian_packages(commands: list[str]) -> None:
    """apt-get install the Debian packages of the missing commands (idempotent, as tools/dev/setup.sh)."""
    missing = [DEBIAN_PACKAGES[c] for c in commands if shutil.which(c) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ImageError(f"the Debian packages {' '.join(missing)} are missing; install them as root")
    log(f"installing Debian packages: {' '.join(missing)}")
    # policy-rc.d keeps the package's init script from starting a daemon with its default settings.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    for step in (["update", "-qq"], ["install", "-y", "-qq", "--no-install-recommends", *missing]):
        result = run(["apt-get", "-o", "DPkg::Lock::Timeout=300", *step], env=env)
        if result.returncode != 0:
            raise ImageError(f"apt-get {step[0]} failed: {result.stderr.strip()[-500:]}")


def ca_bundle() -> Path | None:
    """The CA bundle HTTPS clients here are configured with: pip's (PIP_CERT, pip config) or requests'."""
    candidates = [os.environ.get(name) for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")]
    result = run([sys.executable, "-m", "pip", "config", "get", "global.cert"])
    candidates.append(result.stdout.strip() if result.returncode == 0 else None)
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def apt_mirror_and_proxy() -> tuple[str, dict[str, str]]:
    """The Debian mirror (first URI for bookworm in this machine's apt sources) and apt's HTTP(S) proxy."""
    mirror = "http://deb.debian.org/debian"
    sources = [*sorted(Path("/etc/apt/sources.list.d").glob("*.sources")), Path("/etc/apt/sources.list")]
    for source in sources:
        text = source.read_text() if source.is_file() else ""
        deb822 = re.search(r"^URIs:\s*(\S+/debian)/?\s*$(?:(?!^\s*$).)*?^Suites:.*\bbookworm\b", text, re.M | re.S)
        one_line = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+bookworm\s", text, re.M)
        found = deb822 or one_line
        if found:
            mirror = found.group(1)
            break
    proxies: dict[str, str] = {}
    dump = run(["apt-config", "dump"]).stdout if shutil.which("apt-config") else ""
    for scheme in ("http", "https"):
        match = re.search(rf'^Acquire::{scheme}::Proxy "([^"]+)";', dump, re.M)
        value = match.group(1) if match else os.environ.get(f"{scheme}_proxy")
        if value and value.upper() != "DIRECT":
            proxies[f"{scheme}_proxy"] = value
    return mirror, proxies


# ------------------------------------------------------------------------------------------ the daemon


@functools.cache
def docker_cli() -> str:
    """A docker CLI that builds with BuildKit: one with the buildx plugin, else Debian's (built in)."""
    found = shutil.which("docker")
    if found and run([found, "buildx", "version"]).returncode == 0:
        return found
    install_debian_packages(["dockerd"])
    return "/usr/bin/docker"


def docker(*args: str, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = run([docker_cli(), *args], timeout=timeout, env={**os.environ, "DOCKER_BUILDKIT": "1"})
    if check and result.returncode != 0:
        raise ImageError(f"docker {args[0]} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def _wait(check: list[str], what: str, log_file: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while run(check).returncode != 0:
        if process.poll() is not None:
            raise ImageError(f"{what} exited ({process.returncode}) at start; its log {log_file}:\n{tail(log_file)}")
        if time.monotonic() > deadline:
            raise ImageError(f"{what} did not answer within {timeout:.0f}s; its log {log_file}:\n{tail(log_file)}")
        time.sleep(0.5)


def ensure_daemon() -> None:
    """A Docker daemon answering on the default socket: the running one, else Debian's dockerd started here."""
    cli = docker_cli()
    if run([cli, "info"], timeout=30).returncode == 0:
        return
    install_debian_packages(["dockerd", "containerd"])
    logs = cache_root() / "daemon"
    logs.mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with (RUN_DIR / "start.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another build may be starting it
        if run([cli, "info"], timeout=30).returncode == 0:
            return
        socket = RUN_DIR / "containerd" / "containerd.sock"
        config = RUN_DIR / "containerd.toml"
        config.write_text(
            "version = 2\n"
            'root = "/var/lib/runbook-image/containerd"\n'
            f'state = "{RUN_DIR / "containerd-state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{socket}"\n'
        )
        started = time.monotonic()
        containerd_log = logs / "containerd.log"
        if run(["ctr", "--address", str(socket), "version"]).returncode != 0:
            with containerd_log.open("ab") as out:
                containerd = subprocess.Popen(
                    ["containerd", "--config", str(config)], stdout=out, stderr=out, start_new_session=True
                )
            (RUN_DIR / "containerd.pid").write_text(str(containerd.pid))
            _wait(["ctr", "--address", str(socket), "version"], "containerd", containerd_log, containerd, 30)
        dockerd_log = logs / "dockerd.log"
        args = ["dockerd", "--containerd", str(socket), "--storage-driver", "overlay2", "--iptables=false"]
        args += ["--ip-forward=false", "--ip-masq=false", "--bridge=none", "--pidfile", str(RUN_DIR / "dockerd.pid")]
        with dockerd_log.open("ab") as out:
            dockerd = subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True)
        _wait([cli, "info"], "dockerd", dockerd_log, dockerd, 60)
        log(f"started dockerd (pid {dockerd.pid}) in {time.monotonic() - started:.1f}s; logs in {logs}")


def stop_daemon() -> None:
    """Stop the dockerd and containerd that ensure_daemon started (by their pid files; others are left alone)."""
    for name in ("dockerd", "containerd"):
        pid_file = RUN_DIR / f"{name}.pid"
        if not pid_file.is_file():
            continue
        pid = int(pid_file.read_text().strip() or 0)
        cmdline = Path(f"/proc/{pid}/cmdline")
        if pid and cmdline.is_file() and cmdline.read_bytes().split(b"\0")[0].endswith(name.encode()):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while cmdline.is_file() and time.monotonic() < deadline:
                time.sleep(0.2)
            if cmdline.is_file():
                raise ImageError(f"{name} (pid {pid}) did not stop within 30s")
            log(f"stopped {name} (pid {pid})")
        pid_file.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ images


def image_label(name: str) -> str | None:
    """The image's inputs label ("" when it has none), or None when no such image is present."""
    result = docker("image", "inspect", "--format", f'{{{{index .Config.Labels "{LABEL}"}}}}', name, check=False)
    if result.returncode != 0:
        return None
    value = result.stdout.strip()
    return "" if value == "<no value>" else value


def image_id(name: str) -> str:
    return docker("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()


def base_key(mirror: str) -> str:
    return digest_of((BASE_SCRIPT,), mirror)


def debian_base_tar(mirror: str, proxies: dict[str, str]) -> Path:
    """The debootstrapped root filesystem, built by base-rootfs.sh unless cached."""
    tar = cache_root() / f"base-{base_key(mirror)}" / "rootfs.tar"
    if tar.is_file():
        return tar
    install_debian_packages(["debootstrap"])
    tar.parent.mkdir(parents=True, exist_ok=True)
    with (cache_root() / "base.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tar.is_file():
            return tar
        log(f"building {BASE_IMAGE} from Debian's packages ({mirror}) with debootstrap")
        started = time.monotonic()
        result = subprocess.run(
            ["nice", "-n", "10", "bash", str(BASE_SCRIPT), str(tar), mirror],
            env={**os.environ, **proxies},
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ImageError(f"building the base from Debian failed: {result.stderr.strip()[-2000:]}")
        log(f"debootstrapped the base in {time.monotonic() - started:.0f}s ({tar.stat().st_size / 2**20:.0f} MiB)")
    return tar


def ensure_base() -> str:
    """The base image present under BASE_IMAGE: a registry image already there or pulled, else (or if it
    is an older build of ours) the Debian one, imported from the cached root filesystem. Returns its ID."""
    ensure_daemon()
    mirror, proxies = apt_mirror_and_proxy()
    key = base_key(mirror)
    present = image_label(BASE_IMAGE)
    if present in (key, ""):  # ours and current, or the registry's own image
        return image_id(BASE_IMAGE)
    if present is None and os.environ.get("RUNBOOK_IMAGE_BASE") != "debian":
        try:
            pulled = docker("pull", BASE_IMAGE, timeout=PULL_TIMEOUT, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            pulled = False
        if pulled:
            return image_id(BASE_IMAGE)
        log(f"{BASE_IMAGE} cannot be pulled: building it from Debian's packages")
    tar = debian_base_tar(mirror, proxies)
    changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        f"LABEL {LABEL}={key}",
        'CMD ["python3"]',
    ]
    started = time.monotonic()
    docker("import", *(arg for change in changes for arg in ("--change", change)), str(tar), BASE_IMAGE)
    log(f"imported {BASE_IMAGE} from {tar} in {time.monotonic() - started:.1f}s")
    return image_id(BASE_IMAGE)


def tar_path(spec: Spec, key: str) -> Path:
    return cache_root() / "tars" / f"{spec.slug}-{key}.tar"


def build(spec: Spec, base_id: str) -> Path:
    """Build one image unless its current build is present, export it with ``docker save``; its tar path."""
    mirror, proxies = apt_mirror_and_proxy()
    key = digest_of(spec.inputs, base_id)
    tar = tar_path(spec, key)
    if image_label(spec.name) == key and tar.is_file():
        return tar
    args = ["build", "--network", "host", "--label", f"{LABEL}={key}", "-t", spec.name, "-f", str(spec.dockerfile)]
    args += [arg for name, value in proxies.items() for arg in ("--build-arg", f"{name}={value}")]
    bundle = ca_bundle()
    if bundle is not None:
        args += ["--secret", f"id=ca-bundle,src={bundle}"]
    log(f"building {spec.name} from {spec.dockerfile.relative_to(REPO_ROOT)} (Debian mirror {mirror})")
    started = time.monotonic()
    result = subprocess.run(
        ["nice", "-n", "10", docker_cli(), *args, str(spec.context)],
        env={**os.environ, "DOCKER_BUILDKIT": "1", "BUILDKIT_PROGRESS": "plain"},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ImageError(f"docker build of {spec.name} failed:\n{result.stderr.strip()[-3000:]}")
    built = time.monotonic() - started
    # The previous build of this name, now untagged (only ours: dangling images carrying the label).
    docker("image", "prune", "--force", "--filter", f"label={LABEL}", check=False)
    tar.parent.mkdir(parents=True, exist_ok=True)
    for old in tar.parent.glob(f"{spec.slug}-*.tar"):
        old.unlink()
    docker("save", "-o", f"{tar}.partial", spec.name)
    Path(f"{tar}.partial").rename(tar)
    log(f"built {spec.name} in {built:.0f}s, {image_size(spec.name) / 1e6:.0f} MB; saved to {tar}")
    return tar


def image_size(name: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", name).stdout.strip())


def build_operator() -> Path:
    return build(operator_spec(), ensure_base())


def build_e2e() -> dict[str, Path]:
    base_id = ensure_base()
    return {spec.name: build(spec, base_id) for spec in e2e_specs()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["base", "build", "e2e", "tars", "daemon", "stop"])
    args = parser.parse_args(argv)
    try:
        if args.command == "daemon":
            ensure_daemon()
        elif args.command == "stop":
            stop_daemon()
        elif args.command == "base":
            print(ensure_base())
        elif args.command == "build":
            tar = build_operator()
            name = operator_image()
            print(f"{name} {image_size(name) / 1e6:.0f} MB {tar}")
        elif args.command == "e2e":
            for name, tar in build_e2e().items():
                print(f"{name} {image_size(name) / 1e6:.0f} MB {tar}")
        else:
            print(json.dumps({operator_image(): str(build_operator())} | {k: str(v) for k, v in build_e2e().items()}))
    except ImageError as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

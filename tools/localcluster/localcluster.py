#!/usr/bin/env python3
"""Build and run a real local Kubernetes control plane on loopback, without Docker.

Components: etcd, kube-apiserver (RBAC on), kube-controller-manager, kube-scheduler, all built from the
published Go modules (see go.mod, gen-replace.py), and kwok (its own module under kwok/), which turns a
few Node objects into fake nodes that "run" scheduled pods. Binaries are cached outside the repository in
``${RUNBOOK_CACHE_DIR:-~/.cache/runbook-operator}/localcluster/bin-<hash of the module files>/``.

``--real-node`` adds a real node, ``real-node``, whose pods really run: containerd (with Debian's runc),
the kubelet, kube-proxy, the CNI reference plugins, kube-router (NetworkPolicy; the host drops the ICMP
errors of its rejections, so a denied connection times out), CoreDNS (a pod in kube-system behind the kube-dns
Service) and locally built images (pause, CoreDNS, a test tool), cached in ``node-bin-<hash>/`` beside the
control plane's binaries. It needs root and the Debian packages of ``node-setup.sh``. Pods reach only pods and
Services of this cluster.

CLI::

    python tools/localcluster/localcluster.py build|start|stop|status|kubeconfig [--state-dir DIR] [--real-node]
    python tools/localcluster/localcluster.py import-image FILE [--state-dir DIR]   (an OCI or docker-archive tar)

``start`` detaches: the components keep running after it returns (PIDs in ``DIR/pids.json``) until
``stop``. From Python (pytest), ``with LocalCluster(state_dir) as cluster:`` stops everything on exit,
on SIGTERM, at interpreter exit, and (via PR_SET_PDEATHSIG) when the Python process is killed.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import contextlib
import ctypes
import datetime
import fcntl
import hashlib
import io
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
KWOK_MODULE = HERE / "kwok"
DEFAULT_STATE_DIR = REPO_ROOT / ".cache" / "localcluster"
MIN_GO = (1, 26)
GO_INSTALL_HINT = "install Go >= 1.26 from https://go.dev/dl or your distribution's packages"
# Files whose content decides what gets built; a change to any of them selects a new binary directory.
BUILD_INPUTS = (
    HERE / "go.mod",
    HERE / "go.sum",
    HERE / "cmd" / "etcd" / "main.go",
    KWOK_MODULE / "go.mod",
    KWOK_MODULE / "go.sum",
)
# binary name -> (module directory, package)
BINARIES: dict[str, tuple[Path, str]] = {
    "etcd": (HERE, "./cmd/etcd"),
    "kube-apiserver": (HERE, "k8s.io/kubernetes/cmd/kube-apiserver"),
    "kube-controller-manager": (HERE, "k8s.io/kubernetes/cmd/kube-controller-manager"),
    "kube-scheduler": (HERE, "k8s.io/kubernetes/cmd/kube-scheduler"),
    "kubectl": (HERE, "k8s.io/kubernetes/cmd/kubectl"),
    "kwok": (KWOK_MODULE, "sigs.k8s.io/kwok/cmd/kwok"),
}
CONTROLLERS = (
    "garbage-collector-controller",
    "cronjob-controller",
    "job-controller",
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "horizontal-pod-autoscaler-controller",
    "disruption-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "ttl-after-finished-controller",
    "pod-garbage-collector-controller",
    "node-lifecycle-controller",
    "resourcequota-controller",
)
SERVICE_CIDR = "10.96.0.0/16"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
# With a real node the fake nodes carry this taint, so that ordinary pods land on the real node.
FAKE_NODE_TAINT = {"key": "localcluster.runbook.dev/fake-node", "effect": "NoSchedule"}

# The real node. One per machine: the bridge, the pod network and the host's iptables rules are fixed.
NODE_NAME = "real-node"
NODE_BRIDGE = "rblc0"
POD_CIDR = "10.245.0.0/24"
NODE_IP = "10.245.0.1"  # the bridge's address: the kubelet and the API server listen on it
DNS_SERVICE_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
NODE_CGROUP_ROOT = "runbook-localcluster"  # under every cgroup hierarchy's root
NODE_IPTABLES_CHAIN = "RUNBOOK-LOCALCLUSTER-PODS"  # mangle: what pods may reach
NODE_API_CHAIN = "RUNBOOK-LOCALCLUSTER-API"  # filter: the API server's port, from loopback and pods only
NODE_REJECTS_CHAIN = "RUNBOOK-LOCALCLUSTER-REJECTS"  # mangle: kube-router's rejections become drops
NODE_FORWARD_CHAIN = "RUNBOOK-LOCALCLUSTER-FORWARD"  # mangle: nothing from pods is forwarded off the bridge
# Chains and ipsets the node's components make (ours; KUBE-: kubelet, kube-proxy, kube-router; CNI-: portmap)
NODE_CHAIN_PREFIXES = ("RUNBOOK-LOCALCLUSTER-", "KUBE-", "CNI-HOSTPORT-", "CNI-DN-")
NODE_IPSET_PREFIXES = ("KUBE-", "kube-router-")
CNI_NETWORK = "runbook-localcluster"
PAUSE_IMAGE = "localcluster.local/pause:1"
TEST_IMAGE = "localcluster.local/nettool:1"
COREDNS_IMAGE = "localcluster.local/coredns:1"
NODE_SETUP_HINT = f"run {HERE / 'node-setup.sh'} (installs runc, iptables, ipset and conntrack from Debian)"
NODE_MODULES = ("node", "containerd", "cni", "kube-router", "coredns", "images")
NODE_BUILD_INPUTS = (
    *(HERE / module / name for module in NODE_MODULES for name in ("go.mod", "go.sum") if module != "images"),
    HERE / "images" / "go.mod",
    HERE / "coredns" / "main.go",
    HERE / "images" / "pause" / "main.go",
    HERE / "images" / "nettool" / "main.go",
)
CONTAINERD_VERSION_PACKAGE = "github.com/containerd/containerd/v2/version.Version"
# binary name -> (module directory, package); CNI plugins go to cni/, where containerd looks for them.
NODE_BINARIES: dict[str, tuple[Path, str]] = {
    "kubelet": (HERE / "node", "k8s.io/kubernetes/cmd/kubelet"),
    "kube-proxy": (HERE / "node", "k8s.io/kubernetes/cmd/kube-proxy"),
    "containerd": (HERE / "containerd", "github.com/containerd/containerd/v2/cmd/containerd"),
    "containerd-shim-runc-v2": (HERE / "containerd", "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"),
    "ctr": (HERE / "containerd", "github.com/containerd/containerd/v2/cmd/ctr"),
    "cni/bridge": (HERE / "cni", "github.com/containernetworking/plugins/plugins/main/bridge"),
    "cni/host-local": (HERE / "cni", "github.com/containernetworking/plugins/plugins/ipam/host-local"),
    "cni/loopback": (HERE / "cni", "github.com/containernetworking/plugins/plugins/main/loopback"),
    "cni/portmap": (HERE / "cni", "github.com/containernetworking/plugins/plugins/meta/portmap"),
    "kube-router": (HERE / "kube-router", "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"),
    "coredns": (HERE / "coredns", "."),
    "pause": (HERE / "images", "./pause"),
    "nettool": (HERE / "images", "./nettool"),
}
# image name -> (binary in it, its entrypoint, its user)
NODE_IMAGES: dict[str, tuple[str, list[str], str]] = {
    PAUSE_IMAGE: ("pause", ["/pause"], "65535:65535"),
    TEST_IMAGE: ("nettool", ["/nettool"], "65532:65532"),
    COREDNS_IMAGE: ("coredns", ["/coredns"], "65532:65532"),
}
# Host settings the kubelet or the node's network change; recorded at start, put back at stop.
HOST_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
)
MNT_DETACH = 2
FAKE_NODE_COUNT = 3
PORT_ATTEMPTS = 4
PR_SET_PDEATHSIG = 1

# kwok "stages": how a fake node becomes Ready, how a pod bound to it becomes Running and Ready, and
# that a pod being deleted goes away at once (there is no kubelet to finish graceful termination).
# Pods of Jobs stay Running; a test that needs a finished Job sets the pod status itself.
KWOK_STAGES = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: fake-node-ready
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
    - key: '.status.conditions.[] | select(.type == "Ready") | .status'
      operator: NotIn
      values: ['True']
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      {{ range NodeConditions }}
      - type: {{ .type | Quote }}
        status: {{ .status | Quote }}
        reason: {{ .reason | Quote }}
        message: {{ .message | Quote }}
        lastHeartbeatTime: {{ $now | Quote }}
        lastTransitionTime: {{ $now | Quote }}
      {{ end }}
      addresses:
      - {type: InternalIP, address: {{ NodeIP | Quote }}}
      - {type: Hostname, address: {{ .metadata.name | Quote }}}
      capacity: {cpu: "32", memory: 128Gi, pods: "110"}
      allocatable: {cpu: "32", memory: 128Gi, pods: "110"}
      nodeInfo:
        architecture: amd64
        operatingSystem: linux
        kubeletVersion: fake
        containerRuntimeVersion: fake
        kernelVersion: fake
        kubeProxyVersion: fake
        osImage: fake
        machineID: ""
        bootID: ""
        systemUUID: ""
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: fake-pod-running
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: .metadata.deletionTimestamp, operator: DoesNotExist}
    - {key: .status.phase, operator: In, values: [Pending]}
  next:
    statusTemplate: |
      {{ $now := Now }}
      phase: Running
      startTime: {{ $now | Quote }}
      conditions:
      {{ range list "PodScheduled" "Initialized" "ContainersReady" "Ready" }}
      - {type: {{ . }}, status: "True", lastTransitionTime: {{ $now | Quote }}}
      {{ end }}
      {{ range .spec.readinessGates }}
      - {type: {{ .conditionType | Quote }}, status: "True", lastTransitionTime: {{ $now | Quote }}}
      {{ end }}
      containerStatuses:
      {{ range .spec.containers }}
      - name: {{ .name | Quote }}
        image: {{ .image | Quote }}
        ready: true
        started: true
        restartCount: 0
        state: {running: {startedAt: {{ $now | Quote }}}}
      {{ end }}
      {{ with NodeIPWith .spec.nodeName }}
      hostIP: {{ . | Quote }}
      {{ end }}
      {{ with PodIPWith .spec.nodeName false .metadata.uid .metadata.name .metadata.namespace }}
      podIP: {{ . | Quote }}
      {{ end }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: fake-pod-gone
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: .metadata.deletionTimestamp, operator: Exists}
  next:
    delete: true
"""


class LocalClusterError(RuntimeError):
    """The local control plane could not be built, started or stopped; the message says why."""


class PortInUseError(LocalClusterError):
    """A component could not bind its port because another process took it first."""


def log(message: str) -> None:
    print(f"[localcluster] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- build


def cache_root() -> Path:
    base = os.environ.get("RUNBOOK_CACHE_DIR") or str(Path.home() / ".cache" / "runbook-operator")
    return Path(base) / "localcluster"


def _input_hash(inputs: tuple[Path, ...]) -> str:
    digest = hashlib.sha256()
    for path in inputs:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def bin_dir() -> Path:
    return cache_root() / f"bin-{_input_hash(BUILD_INPUTS)}"


def node_bin_dir() -> Path:
    return cache_root() / f"node-bin-{_input_hash(NODE_BUILD_INPUTS)}"


def find_go() -> str:
    """Path of a Go toolchain >= MIN_GO: $GO, else `go` on PATH, else the go.dev tarball location."""
    override = os.environ.get("GO")
    candidates = [override] if override else [shutil.which("go"), "/usr/local/go/bin/go"]
    go = next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)
    if go is None:
        where = f"GO={override} is not an executable" if override else "no `go` on PATH or in /usr/local/go/bin"
        raise LocalClusterError(
            f"Go is needed to build the local control plane ({where}): {GO_INSTALL_HINT}."
            " Or test against your own cluster: RUNBOOK_TEST_KUBECONFIG=/path/to/kubeconfig."
        )
    output = subprocess.run([go, "version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"go(\d+)\.(\d+)", output)
    if match is None or (int(match.group(1)), int(match.group(2))) < MIN_GO:
        found = match.group(0) if match else repr(output.strip())
        raise LocalClusterError(f"{go} is {found}, too old to build Kubernetes 1.36: {GO_INSTALL_HINT}.")
    return go


def kubernetes_version() -> str:
    return required_kubernetes_version(HERE / "go.mod")


def required_kubernetes_version(go_mod: Path) -> str:
    match = re.search(r"k8s\.io/kubernetes\s+(v\d+\.\d+\.\d+)", go_mod.read_text())
    if match is None:
        raise LocalClusterError(f"{go_mod} does not require k8s.io/kubernetes")
    return match.group(1)


def version_ldflags(version: str) -> str:
    """Stamp the version, so `kubectl version` and discovery report v1.36.x rather than v0.0.0-master."""
    major, minor = version.removeprefix("v").split(".")[:2]
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {package}.gitVersion={version}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
        ]
    return " ".join(flags)


def _ldflags(package: str) -> str:
    if package.startswith("k8s.io/kubernetes/"):
        return version_ldflags(kubernetes_version())
    if package.startswith("github.com/containerd/containerd/v2/"):
        version = re.search(
            r"github\.com/containerd/containerd/v2\s+(v[\d.]+)", (HERE / "containerd" / "go.mod").read_text()
        )
        return f"-s -w -X {CONTAINERD_VERSION_PACKAGE}={version.group(1) if version else 'unknown'}"
    return "-s -w"


def _build(target: Path, binaries: dict[str, tuple[Path, str]], finish: Callable[[Path], None] | None = None) -> Path:
    """Build `binaries` into `target` unless it has them all; `finish` adds more files before it is used."""
    if all((target / name).is_file() for name in binaries):
        return target
    cache_root().mkdir(parents=True, exist_ok=True)
    with (cache_root() / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building the same binaries
        if all((target / name).is_file() for name in binaries):
            return target
        go = find_go()
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        env = {**os.environ, "CGO_ENABLED": "0"}
        log(f"building {len(binaries)} binaries into {target} (the first build takes 10-30 minutes)")
        started = time.monotonic()
        for index, (name, (module, package)) in enumerate(binaries.items(), start=1):
            log(f"[{index}/{len(binaries)}] go build {package}")
            step = time.monotonic()
            result = subprocess.run(
                [go, "build", "-p", "2", "-trimpath", f"-ldflags={_ldflags(package)}", "-o", partial / name, package],
                cwd=module,
                env=env,
                check=False,
            )
            if result.returncode != 0:
                raise LocalClusterError(f"building {name} from {package} failed (exit {result.returncode})")
            log(f"[{index}/{len(binaries)}] {name} done in {time.monotonic() - step:.0f}s")
        if finish is not None:
            finish(partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        log(f"built everything in {time.monotonic() - started:.0f}s")
    return target


def build() -> Path:
    """Build the control plane's binaries unless the cache already has them for the current module files."""
    return _build(bin_dir(), BINARIES)


def build_node() -> Path:
    """Build the real node's binaries and image tarballs (``images/*.tar``) unless the cache has them."""
    if kubernetes_version() != required_kubernetes_version(HERE / "node" / "go.mod"):
        raise LocalClusterError(
            f"{HERE / 'node' / 'go.mod'} must require k8s.io/kubernetes {kubernetes_version()}: run gen-replace.py"
        )

    def write_images(directory: Path) -> None:
        (directory / "images").mkdir()
        for image, (binary, entrypoint, user) in NODE_IMAGES.items():
            image_tar(directory / "images" / f"{binary}.tar", image, directory / binary, entrypoint, user)

    return _build(node_bin_dir(), NODE_BINARIES, write_images)


def image_tar(target: Path, name: str, binary: Path, entrypoint: list[str], user: str) -> None:
    """Write an OCI image layout tarball of one layer holding `binary` at entrypoint[0], named `name`."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        content = binary.read_bytes()
        info = tarfile.TarInfo(entrypoint[0].lstrip("/"))
        info.mode, info.size, info.mtime = 0o755, len(content), 0
        tar.addfile(info, io.BytesIO(content))
    layer_bytes = layer.getvalue()
    layer_digest = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": entrypoint, "User": user, "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        },
        sort_keys=True,
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": len(layer_bytes),
                }
            ],
        },
        sort_keys=True,
    ).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    files = {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": index,
        **{
            f"blobs/sha256/{d.split(':')[1]}": b
            for d, b in ((layer_digest, layer_bytes), (config_digest, config), (manifest_digest, manifest))
        },
    }
    with tarfile.open(target, mode="w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------- certificates


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


@dataclass(frozen=True)
class Pki:
    """File paths of the certificates and keys in a state directory."""

    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    def generate(self, client_identities: dict[str, tuple[str, str | None]], server_ips: tuple[str, ...] = ()) -> None:
        """Write a CA, the API server's serving cert, the client certs and the service-account keys.

        client_identities maps a file stem to (user name, group), e.g. {"admin": ("admin", "system:masters")}.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("runbook-localcluster-ca")
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        self.path("ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self.path("ca.key"), ca_key)

        def issue(
            stem: str,
            subject: x509.Name,
            usage: x509.ObjectIdentifier,
            alt_names: list[x509.GeneralName] | None = None,
        ) -> None:
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            )
            if alt_names:
                builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            cert = builder.sign(ca_key, hashes.SHA256())
            self.path(f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            _write_key(self.path(f"{stem}.key"), key)

        service_ip = next(ipaddress.IPv4Network(SERVICE_CIDR).hosts())
        dns_names = [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        issue(
            "apiserver",
            _name("kube-apiserver"),
            ExtendedKeyUsageOID.SERVER_AUTH,
            [
                x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                *(x509.IPAddress(ipaddress.IPv4Address(ip)) for ip in server_ips),
                x509.IPAddress(service_ip),
                *(x509.DNSName(name) for name in dns_names),
            ],
        )
        for stem, (user, group) in client_identities.items():
            issue(stem, _name(user, group), ExtendedKeyUsageOID.CLIENT_AUTH)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_key(self.path("sa.key"), sa_key)
        self.path("sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


# --------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _loopback_opener(*handlers: urllib.request.BaseHandler) -> urllib.request.OpenerDirector:
    """An opener that ignores HTTP(S)_PROXY from the environment: everything here is on loopback."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), *handlers)


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGKILL to it when the launching process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def terminate_group(pid: int, *, grace: float = 10.0) -> None:
    """SIGTERM the process group led by pid, then SIGKILL whatever is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
            if not _alive(pid):
                return
            time.sleep(0.05)
    raise LocalClusterError(f"process {pid} survived SIGKILL")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# --------------------------------------------------------------------------------------- real node

# The state dir of the machine's real node and the PID of the process that started it (lines 1 and 2), written
# and checked under NODE_OWNER_LOCK, so two starters never both take the node.
NODE_OWNER_FILE = Path("/run/runbook-localcluster/real-node-owner")
NODE_OWNER_LOCK = Path("/run/runbook-localcluster/real-node-owner.lock")

CONTAINERD_CONFIG = """\
version = 3
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause}"

[plugins."io.containerd.cri.v1.runtime"]
  netns_mounts_under_state_dir = true
  # Keep the kubelet's oom_score_adj (-998 for sandboxes) within what this process may set: a host
  # without CAP_SYS_RESOURCE (a container, some VMs) refuses a lower one and no pod would start.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{runc_root}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{cni_conf}"
    max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""

# CoreDNS runs as a pod in kube-system (k8s-app=kube-dns, as in kubeadm's clusters) behind the kube-dns Service,
# with a ServiceAccount of its own and the API server in-cluster (the `kubernetes` Service), so that NetworkPolicies
# treat it as they do in a real cluster (an isolation's DNS rule allows kube-system pods on port 53). No forward
# plugin: names outside the cluster do not resolve.
COREDNS_NAME = "coredns"
COREDNS_HEALTH_PORT = 8080
COREDNS_READY_PORT = 8181
COREFILE = f"""\
.:53 {{
    errors
    health :{COREDNS_HEALTH_PORT}
    ready :{COREDNS_READY_PORT}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
    }}
    cache 5
}}
"""
DNS_LABELS = {"k8s-app": "kube-dns"}
DNS_PORTS = [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]
# (API path, object), created in this order at start.
COREDNS_OBJECTS: list[tuple[str, dict[str, Any]]] = [
    (
        "/api/v1/namespaces/kube-system/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": COREDNS_NAME, "namespace": "kube-system"}},
    ),
    (
        # What the kubernetes plugin watches (plugin/kubernetes/controller.go): pods only with `pods verified`.
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "localcluster:coredns"},
            "rules": [
                {"apiGroups": [""], "resources": ["services", "namespaces"], "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        },
    ),
    (
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "localcluster:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "localcluster:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": COREDNS_NAME, "namespace": "kube-system"}],
        },
    ),
    (
        "/api/v1/namespaces/kube-system/configmaps",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": COREDNS_NAME, "namespace": "kube-system"},
            "data": {"Corefile": COREFILE},
        },
    ),
    (
        "/apis/apps/v1/namespaces/kube-system/deployments",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": COREDNS_NAME, "namespace": "kube-system", "labels": DNS_LABELS},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": DNS_LABELS},
                "template": {
                    "metadata": {"labels": DNS_LABELS},
                    "spec": {
                        "serviceAccountName": COREDNS_NAME,
                        "priorityClassName": "system-cluster-critical",
                        "dnsPolicy": "Default",  # not itself (and the kubelet's resolvConf is empty)
                        "terminationGracePeriodSeconds": 1,
                        "securityContext": {
                            "runAsNonRoot": True,
                            # Port 53 without a capability: a non-root process loses added capabilities at exec.
                            "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "53"}],
                        },
                        "containers": [
                            {
                                "name": COREDNS_NAME,
                                "image": COREDNS_IMAGE,
                                "imagePullPolicy": "Never",
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                ],
                                "readinessProbe": {
                                    "httpGet": {"path": "/ready", "port": COREDNS_READY_PORT},
                                    "periodSeconds": 1,
                                    "failureThreshold": 3,
                                },
                                "livenessProbe": {
                                    "httpGet": {"path": "/health", "port": COREDNS_HEALTH_PORT},
                                    "periodSeconds": 10,
                                    "failureThreshold": 5,
                                },
                                "securityContext": {
                                    "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]},
                                },
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": COREDNS_NAME}}],
                    },
                },
            },
        },
    ),
    (
        "/api/v1/namespaces/kube-system/services",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": DNS_LABELS},
            "spec": {
                "clusterIP": DNS_SERVICE_IP,
                "selector": DNS_LABELS,
                "ports": [{**port, "targetPort": 53} for port in DNS_PORTS],
            },
        },
    ),
]


def check_node_host() -> None:
    """Raise a LocalClusterError naming what is missing for a real node on this machine."""
    if os.geteuid() != 0:
        raise LocalClusterError("the real node needs root (containers, cgroups, a bridge and iptables rules)")
    missing = [
        tool for tool in ("runc", "iptables", "iptables-restore", "ipset", "conntrack") if not shutil.which(tool)
    ]
    if missing:
        raise LocalClusterError(f"the real node needs {', '.join(missing)} on PATH: {NODE_SETUP_HINT}")
    if not cgroup_hierarchies():
        raise LocalClusterError("no cgroup hierarchy is mounted under /sys/fs/cgroup: the kubelet cannot run pods")
    if not Path("/proc/sys/net/bridge").is_dir():
        raise LocalClusterError("the kernel has no br_netfilter (/proc/sys/net/bridge): Services and policies need it")
    filesystems = Path("/proc/filesystems").read_text()
    if "overlay" not in filesystems:
        raise LocalClusterError("the kernel has no overlay filesystem: containerd's overlayfs snapshotter needs it")


def _owner_record() -> tuple[Path, int] | None:
    """(state dir, starter PID) of NODE_OWNER_FILE, None when there is none."""
    try:
        lines = NODE_OWNER_FILE.read_text().split()
    except OSError:
        return None
    if not lines:
        return None
    return Path(lines[0]), int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else 0


def node_owner() -> Path | None:
    """The state dir of the real node of this machine while it lives: its containerd runs, or the process that
    claimed it is still starting it."""
    record = _owner_record()
    if record is None:
        return None
    owner, starter = record
    starting = starter not in (0, os.getpid()) and Path(f"/proc/{starter}").exists()
    return owner if starting or pids_mentioning(f"--config={owner / 'containerd.toml'}") else None


def run_host(args: list[str], *, check: bool = True) -> None:
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise LocalClusterError(f"{' '.join(args)} failed: {result.stderr.strip()}")


def remove_node_iptables() -> None:
    """Delete the iptables chains and ipsets of the real node: ours, the kubelet's, kube-proxy's and
    kube-router's (KUBE-*), and the CNI portmap plugin's, with the rules of the built-in chains that
    jump to them. The owner file makes the real node the only user of these names on the machine."""
    if not shutil.which("iptables-save"):
        return
    for table in ("filter", "nat", "mangle", "raw"):
        dump = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True, check=False).stdout
        chains = [line[1:].split()[0] for line in dump.splitlines() if line.startswith(":")]
        ours = [chain for chain in chains if chain.startswith(NODE_CHAIN_PREFIXES)]
        for line in dump.splitlines():
            fields = line.split()
            if fields[:1] == ["-A"] and fields[1] not in ours and "-j" in fields:
                target = fields[fields.index("-j") + 1]
                if target in ours:  # a jump from a built-in chain; iptables-save quotes like a shell
                    run_host(["iptables", "-w", "-t", table, "-D", *shlex.split(line)[1:]], check=False)
        for flag in ("-F", "-X"):
            for chain in ours:
                run_host(["iptables", "-w", "-t", table, flag, chain], check=False)
    if shutil.which("ipset"):
        names = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, check=False).stdout.split()
        for name in names:
            if name.startswith(NODE_IPSET_PREFIXES):
                run_host(["ipset", "destroy", name], check=False)


def read_sysctl(key: str) -> str | None:
    try:
        return (Path("/proc/sys") / key).read_text().strip()
    except OSError:
        return None


def write_sysctl(key: str, value: str) -> None:
    try:
        (Path("/proc/sys") / key).write_text(value)
    except OSError as error:
        raise LocalClusterError(f"cannot set {key.replace('/', '.')}={value}: {error}") from error


def cgroup_hierarchies() -> list[Path]:
    """Mount points of the cgroup hierarchies (v1 controllers, the named systemd one, a v2 unified one)."""
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] in ("cgroup", "cgroup2"):
            mounts.append(Path(fields[1]))
    return mounts


def _cgroups_bottom_up(root: Path) -> list[Path]:
    """``root`` and the cgroups below it, deepest first; cgroups removed meanwhile (the kubelet's) are left out."""
    found: list[Path] = []
    with contextlib.suppress(FileNotFoundError):
        found = [p for p in root.rglob("*") if p.is_dir()]
    if not root.is_dir():
        return []
    return [*sorted(found, key=lambda p: len(p.parts), reverse=True), root]


def _cgroup_pids(group: Path) -> list[int]:
    try:
        return [int(pid) for pid in (group / "cgroup.procs").read_text().split()]
    except FileNotFoundError:  # removed since it was listed
        return []


def kill_cgroup_tree(root: Path) -> None:
    """SIGKILL every process in `root` and the cgroups below it, until none is left (at most 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = {pid for group in _cgroups_bottom_up(root) for pid in _cgroup_pids(group)}
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise LocalClusterError(f"processes in {root} survived SIGKILL")


def remove_cgroup_tree(root: Path) -> None:
    for group in _cgroups_bottom_up(root):
        with contextlib.suppress(OSError):
            group.rmdir()


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (a state dir path: only our processes have it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and text in _cmdline(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def unmount_under(directory: Path) -> None:
    """Lazily unmount every mount point at or below `directory`, the deepest first."""
    libc = ctypes.CDLL(None, use_errno=True)
    prefix = str(directory)
    for _ in range(3):  # a mount may be stacked over another at the same path
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
        if not points:
            return
        for point in sorted(set(points), key=len, reverse=True):
            libc.umount2(point.encode(), MNT_DETACH)


# ----------------------------------------------------------------------------------------- cluster


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok, all in one state dir.

    ``attached=True`` (the default, for tests) ties the processes to this Python process: they are
    stopped on ``stop()``, on leaving the ``with`` block, at exit, on SIGTERM, and killed by the kernel
    if Python itself is killed. ``attached=False`` (the CLI's ``start``) leaves them running for ``stop``.
    ``audit_policy`` (an audit.k8s.io/v1 Policy as YAML; default none: no audit log) turns on the API
    server's audit log at ``audit_log``, as the benchmarks use it to count a client's requests.
    """

    def __init__(
        self,
        state_dir: Path | str = DEFAULT_STATE_DIR,
        *,
        attached: bool = True,
        ready_timeout: float = 90.0,
        port_picker: Callable[[], int] = free_port,
        audit_policy: str | None = None,
        real_node: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.attached = attached
        self.real_node = real_node
        self.audit_policy = audit_policy
        self.ready_timeout = ready_timeout
        self.port_picker = port_picker
        self.pki = Pki(self.state_dir / "pki")
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._bin: Path | None = None
        self._node_bin: Path | None = None
        self._server = ""
        self._stop_registered = False

    # -- public surface

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "pids.json"

    @property
    def audit_log(self) -> Path:
        """The API server's audit log (JSON lines), written only when ``audit_policy`` was given."""
        return self.state_dir / "audit.log"

    @property
    def server(self) -> str:
        return self._server

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start every component and wait until the API server is ready and the nodes are Ready."""
        self._bin = build()
        if self.real_node:
            self._node_bin = build_node()
            check_node_host()
        if self.attached and not self._stop_registered:
            atexit.register(self.stop)
            self._chain_sigterm()
            self._stop_registered = True
        started = time.monotonic()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._start_once()
                break
            except PortInUseError as error:
                self.stop()
                if attempt == PORT_ATTEMPTS:
                    raise LocalClusterError(f"gave up after {attempt} attempts: {error}") from error
                log(f"{error}; retrying with other ports ({attempt}/{PORT_ATTEMPTS})")
            except BaseException:
                self.stop()
                raise
        log(f"cluster ready in {time.monotonic() - started:.1f}s; KUBECONFIG={self.kubeconfig}")

    def stop(self) -> None:
        """Stop every process this cluster started (or that its pid file names), newest first."""
        recorded = self._read_pids()
        names = list(dict.fromkeys([*reversed(self._processes), *reversed(recorded)]))
        for name in names:
            process = self._processes.get(name)
            pid = process.pid if process else recorded[name]
            if process is not None or self._is_ours(pid):
                terminate_group(pid)
            if process is not None:
                process.wait()
        self._processes.clear()
        self.pid_file.unlink(missing_ok=True)
        self._teardown_node()

    def status(self) -> dict[str, bool]:
        """Component name -> whether its recorded process is running."""
        return {name: self._is_ours(pid) for name, pid in self._read_pids().items()}

    def is_ready(self) -> bool:
        if not self.kubeconfig.is_file():
            return False
        self._server = json.loads(self.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        try:
            return self._api("GET", "/readyz") == "ok"
        except (OSError, LocalClusterError):
            return False

    def clean_stale(self) -> None:
        """Kill processes a killed earlier run left behind (per its pid file) and empty the state dir."""
        leftovers = {name: pid for name, pid in self._read_pids().items() if self._is_ours(pid)}
        for pid in leftovers.values():
            terminate_group(pid)
        if leftovers:
            log(f"stopped leftovers of an earlier run in {self.state_dir}: {leftovers}")
        self._teardown_node()
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        self.state_dir.mkdir(parents=True)

    # -- internals

    def _start_once(self) -> None:
        self.clean_stale()
        identities: dict[str, tuple[str, str | None]] = {
            "admin": ("runbook-localcluster-admin", "system:masters"),
            "controller-manager": ("system:kube-controller-manager", None),
            "scheduler": ("system:kube-scheduler", None),
            # kwok plays every node's kubelet and deletes terminating pods: simplest as an admin.
            "kwok": ("kwok", "system:masters"),
        }
        if self.real_node:
            identities |= {
                "kubelet": (f"system:node:{NODE_NAME}", "system:nodes"),  # the Node authorizer's identity
                "kube-proxy": ("system:kube-proxy", None),  # bound to system:node-proxier by default
                "kube-router": ("kube-router", "system:masters"),
                "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", "system:masters"),
            }
        # With a real node its pods reach the API server at the node's address (the `kubernetes` Service).
        self.pki.generate(identities, (NODE_IP,) if self.real_node else ())
        etcd_client, etcd_peer, apiserver_port, kwok_port = (self.port_picker() for _ in range(4))
        self._server = f"https://127.0.0.1:{apiserver_port}"
        if self.real_node:
            self._prepare_node_host(apiserver_port)
        for stem in identities:
            if stem == "apiserver-kubelet-client":
                continue
            target = self.kubeconfig if stem == "admin" else self.state_dir / f"{stem}.kubeconfig"
            self._write_kubeconfig(target, stem)

        data = self.state_dir / "etcd-data"
        self._spawn(
            "etcd",
            [
                "--name=localcluster",
                f"--data-dir={data}",
                "--unsafe-no-fsync",
                f"--listen-client-urls=http://127.0.0.1:{etcd_client}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=localcluster=http://127.0.0.1:{etcd_peer}",
                "--listen-metrics-urls=",
                "--log-level=warn",
            ],
        )
        self._wait("etcd", lambda: self._http_ok(f"http://127.0.0.1:{etcd_client}/health", '"health":"true"'))

        pki = self.pki.path
        audit: list[str] = []
        if self.audit_policy is not None:
            policy = self.state_dir / "audit-policy.yaml"
            policy.write_text(self.audit_policy)
            audit = [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}", "--audit-log-format=json"]
        self._spawn(
            "kube-apiserver",
            [
                *audit,
                f"--etcd-servers=http://127.0.0.1:{etcd_client}",
                # The real node's pods need it on the bridge too; NODE_API_CHAIN drops it from anywhere else.
                f"--bind-address={'0.0.0.0' if self.real_node else '127.0.0.1'}",  # noqa: S104 - see above
                f"--advertise-address={NODE_IP if self.real_node else '127.0.0.1'}",
                f"--secure-port={apiserver_port}",
                f"--tls-cert-file={pki('apiserver.crt')}",
                f"--tls-private-key-file={pki('apiserver.key')}",
                f"--client-ca-file={pki('ca.crt')}",
                "--authorization-mode=Node,RBAC",
                "--anonymous-auth=false",
                f"--service-account-key-file={pki('sa.pub')}",
                f"--service-account-signing-key-file={pki('sa.key')}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                f"--cert-dir={self.state_dir / 'apiserver-certs'}",
                *(
                    [
                        f"--kubelet-client-certificate={pki('apiserver-kubelet-client.crt')}",
                        f"--kubelet-client-key={pki('apiserver-kubelet-client.key')}",
                        "--kubelet-preferred-address-types=InternalIP",  # the node's name is in no DNS
                    ]
                    if self.real_node
                    else []
                ),
            ],
        )
        self._wait("kube-apiserver", lambda: self._api("GET", "/readyz") == "ok")

        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={self.state_dir / 'controller-manager.kubeconfig'}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki('sa.key')}",
                f"--root-ca-file={pki('ca.crt')}",
                # The real node's Services need EndpointSlices; kwok's fake pods do not.
                f"--controllers={','.join([*CONTROLLERS, *(['endpointslice-controller'] if self.real_node else [])])}",
                "--secure-port=0",
                "--concurrent-gc-syncs=5",
                "--horizontal-pod-autoscaler-sync-period=5s",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                f"--kubeconfig={self.state_dir / 'scheduler.kubeconfig'}",
                "--leader-elect=false",
                "--secure-port=0",
            ],
        )
        stages = self.state_dir / "kwok-stages.yaml"
        stages.write_text(KWOK_STAGES)
        self._spawn(
            "kwok",
            [
                f"--kubeconfig={self.state_dir / 'kwok.kubeconfig'}",
                f"--config={stages}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
                f"--server-address=127.0.0.1:{kwok_port}",
                "--node-ip=127.0.0.1",
                "--cidr=10.244.0.1/16",
                "--node-lease-duration-seconds=40",  # leases are the heartbeat the node lifecycle checks
            ],
        )
        for index in range(FAKE_NODE_COUNT):
            self._api(
                "POST",
                "/api/v1/nodes",
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": f"fake-node-{index}",
                        "annotations": {FAKE_NODE_ANNOTATION: "fake"},
                        "labels": {
                            "type": "kwok",
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            "kubernetes.io/hostname": f"fake-node-{index}",
                        },
                    },
                    "spec": {"taints": [FAKE_NODE_TAINT]} if self.real_node else {},
                },
            )
        self._wait("kwok", self._nodes_ready)
        # The serviceaccount controller's first act proves the controller manager is working.
        self._wait(
            "kube-controller-manager",
            lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
        )
        if self.real_node:
            self._start_node()

    # -- the real node

    @property
    def node_marker(self) -> Path:
        """Written before the real node touches the host: the host settings to put back at teardown."""
        return self.state_dir / "real-node.json"

    @property
    def containerd_socket(self) -> Path:
        return self.state_dir / "containerd" / "containerd.sock"

    def import_image(self, tarball: Path) -> None:
        """Import an image tarball (OCI layout or docker-archive) into the real node's containerd."""
        if not self.containerd_socket.exists():
            raise LocalClusterError(f"no real node runs for {self.state_dir}: start it with --real-node first")
        if not tarball.is_file():
            raise LocalClusterError(f"image tarball {tarball} does not exist")
        result = subprocess.run(
            [
                str(node_bin_dir() / "ctr"),
                f"--address={self.containerd_socket}",
                "--namespace=k8s.io",
                "images",
                "import",
                "--platform=linux/amd64",
                str(tarball),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise LocalClusterError(f"importing {tarball} failed: {result.stderr.strip() or result.stdout.strip()}")
        log(f"imported {tarball}")

    def _prepare_node_host(self, apiserver_port: int) -> None:
        """Before the API server listens: claim the machine's real node, the bridge, iptables, cgroups."""
        NODE_OWNER_FILE.parent.mkdir(parents=True, exist_ok=True)
        with NODE_OWNER_LOCK.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # check and claim at once: two starters never both see it free
            owner = node_owner()
            if owner is not None and owner != self.state_dir:
                raise LocalClusterError(
                    f"a real node already runs for {owner}: stop that cluster first (one per machine)"
                )
            record = _owner_record()
            if record is not None and record[0] != self.state_dir:  # a real node of a killed run: undo what it left
                log(f"cleaning up the real node a killed run left in {record[0]}")
                with contextlib.suppress(OSError):
                    LocalCluster(record[0])._teardown_node()
            NODE_OWNER_FILE.write_text(f"{self.state_dir}\n{os.getpid()}\n")
        self.node_marker.write_text(json.dumps({"sysctls": {key: read_sysctl(key) for key in HOST_SYSCTLS}}))
        self._setup_host_network(apiserver_port)
        for hierarchy in cgroup_hierarchies():
            path = hierarchy / NODE_CGROUP_ROOT
            try:
                path.mkdir(exist_ok=True)
                for name in ("cpuset.cpus", "cpuset.mems"):  # a new cpuset is empty: no task could join it
                    if (hierarchy / name).is_file() and not (path / name).read_text().strip():
                        (path / name).write_text((hierarchy / name).read_text())
            except OSError as error:
                raise LocalClusterError(f"cannot set up the kubelet's cgroup {path}: {error}") from error

    def _start_node(self) -> None:
        assert self._node_bin is not None
        bin_ = self._node_bin
        pki = self.pki.path
        containerd_dir = self.state_dir / "containerd"
        cni_conf = self.state_dir / "cni-conf"
        cni_conf.mkdir()
        (cni_conf / "10-runbook-localcluster.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": CNI_NETWORK,
                    "plugins": [
                        {
                            # No isGateway: the bridge's address is ours (made before), and the plugin would
                            # switch on forwarding for the whole host. No ipMasq: pods reach nothing outside.
                            "type": "bridge",
                            "bridge": NODE_BRIDGE,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(self.state_dir / "cni-ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                },
                indent=1,
            )
        )
        runc = shutil.which("runc")
        assert runc is not None  # check_node_host
        config = self.state_dir / "containerd.toml"
        config.write_text(
            CONTAINERD_CONFIG.format(
                root=containerd_dir / "root",
                state=containerd_dir / "state",
                socket=self.containerd_socket,
                runc=runc,
                runc_root=containerd_dir / "runc",
                cni_bin=bin_ / "cni",
                cni_conf=cni_conf,
                pause=PAUSE_IMAGE,
            )
        )
        env = {**os.environ, "PATH": f"{bin_}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
        self._spawn("containerd", [f"--config={config}"], binary=bin_ / "containerd", env=env)
        self._wait("containerd", lambda: self._ctr("version").returncode == 0)
        self._import_node_images([PAUSE_IMAGE])  # the kubelet's first sandbox needs it
        # The others load while the node's components start; CoreDNS's Deployment is made once its image is there.
        importer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="import-image")
        images = importer.submit(self._import_node_images, [image for image in NODE_IMAGES if image != PAUSE_IMAGE])
        importer.shutdown(wait=False)

        kubelet_port, kubelet_healthz, proxy_healthz, proxy_metrics, router_health = (
            self.port_picker() for _ in range(5)
        )
        kubelet_config = self.state_dir / "kubelet-config.json"
        kubelet_config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "address": NODE_IP,
                    "port": kubelet_port,
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": kubelet_healthz,
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": False},
                        "x509": {"clientCAFile": str(pki("ca.crt"))},
                    },
                    "authorization": {"mode": "AlwaysAllow"},  # only holders of a cert of our CA get in
                    "cgroupDriver": "cgroupfs",
                    "cgroupRoot": f"/{NODE_CGROUP_ROOT}",
                    "failCgroupV1": False,  # kubelet >= 1.35 refuses cgroup v1 otherwise
                    "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
                    "clusterDNS": [DNS_SERVICE_IP],
                    "clusterDomain": CLUSTER_DOMAIN,
                    "resolvConf": "",  # pods never get the host's resolvers
                    "failSwapOn": False,
                    "protectKernelDefaults": False,
                    "podLogsDir": str(self.state_dir / "pod-logs"),
                    "evictionHard": {
                        "memory.available": "100Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                        "nodefs.inodesFree": "1%",
                    },
                    "imageGCHighThresholdPercent": 100,  # never drop an imported image: nothing can pull it back
                    "imageGCLowThresholdPercent": 99,
                    "nodeStatusUpdateFrequency": "5s",
                    "rotateCertificates": False,
                    "maxPods": 50,
                }
            )
        )
        self._spawn(
            "kubelet",
            [
                f"--config={kubelet_config}",
                f"--kubeconfig={self.state_dir / 'kubelet.kubeconfig'}",
                f"--root-dir={self.state_dir / 'kubelet'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
            ],
            binary=bin_ / "kubelet",
            env=env,
        )
        self._wait("kubelet", lambda: self._api_ok(f"/api/v1/nodes/{NODE_NAME}"))
        self._spawn(
            "kube-proxy",
            [
                f"--kubeconfig={self.state_dir / 'kube-proxy.kubeconfig'}",
                f"--hostname-override={NODE_NAME}",
                "--proxy-mode=iptables",
                f"--cluster-cidr={POD_CIDR}",
                f"--nodeport-addresses={NODE_IP}/32",  # no NodePort on the host's other addresses
                "--iptables-localhost-nodeports=false",  # would set route_localnet on the host
                "--conntrack-max-per-core=0",  # leave the host's conntrack settings alone
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                f"--healthz-bind-address=127.0.0.1:{proxy_healthz}",
                f"--metrics-bind-address=127.0.0.1:{proxy_metrics}",
            ],
            binary=bin_ / "kube-proxy",
            env=env,
        )
        self._spawn(
            "kube-router",
            [
                f"--kubeconfig={self.state_dir / 'kube-router.kubeconfig'}",
                f"--hostname-override={NODE_NAME}",
                "--run-firewall=true",
                "--run-router=false",
                "--run-service-proxy=false",
                "--enable-cni=false",
                "--enable-ipv6=false",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--health-port={router_health}",
                "--metrics-port=0",
            ],
            binary=bin_ / "kube-router",
            env=env,
        )
        # --endpoint-reconciler-type=none: the `kubernetes` Service's endpoint is ours to make.
        apiserver_port = int(self._server.rsplit(":", 1)[1])
        self._api(
            "POST",
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "kubernetes-node",
                    "labels": {
                        "kubernetes.io/service-name": "kubernetes",
                        "endpointslice.kubernetes.io/managed-by": "localcluster",
                    },
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
                "ports": [{"name": "https", "port": apiserver_port, "protocol": "TCP"}],
            },
        )
        images.result()  # its pod would not start without its image (imagePullPolicy: Never), and back off
        for path, body in COREDNS_OBJECTS:
            self._api("POST", path, body)
        self._wait("kube-router", lambda: self._http_ok(f"http://127.0.0.1:{router_health}/healthz", "OK"))
        self._wait("kube-proxy", lambda: self._http_ok(f"http://127.0.0.1:{proxy_healthz}/healthz", "lastUpdated"))
        self._wait("kubelet", self._real_node_ready)
        self._wait("CoreDNS", self._coredns_ready, describe=self._describe_coredns)

    def _import_node_images(self, images: list[str]) -> None:
        assert self._node_bin is not None
        for image in images:
            self.import_image(self._node_bin / "images" / f"{NODE_IMAGES[image][0]}.tar")
            log(f"image {image} ready on the node")

    def _ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self._node_bin is not None
        return subprocess.run(
            [str(self._node_bin / "ctr"), f"--address={self.containerd_socket}", "--namespace=k8s.io", *args],
            capture_output=True,
            text=True,
            check=False,
        )

    def _real_node_ready(self) -> bool:
        node = json.loads(self._api("GET", f"/api/v1/nodes/{NODE_NAME}"))
        conditions = node.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _coredns_pods(self) -> list[dict[str, Any]]:
        selector = ",".join(f"{key}%3D{value}" for key, value in DNS_LABELS.items())
        pods = json.loads(self._api("GET", f"/api/v1/namespaces/kube-system/pods?labelSelector={selector}"))["items"]
        return list(pods)

    def _coredns_ready(self) -> bool:
        return any(
            c["type"] == "Ready" and c["status"] == "True"
            for pod in self._coredns_pods()
            for c in pod.get("status", {}).get("conditions", [])
        )

    def _describe_coredns(self) -> str:
        """Why CoreDNS is not Ready: its pods' phase, conditions and container states, and the tail of its log."""
        try:
            pods = self._coredns_pods()
        except (OSError, LocalClusterError) as error:
            return f"its pods could not be read: {error}"
        if not pods:
            return f"no pod of Deployment kube-system/{COREDNS_NAME} exists (see the controller manager's log)"
        described = []
        for pod in pods:
            name, status = pod["metadata"]["name"], pod.get("status", {})
            parts = [f"pod kube-system/{name} is {status.get('phase', 'unknown')}"]
            if not pod.get("spec", {}).get("nodeName"):
                parts.append("not scheduled")
            for condition in status.get("conditions", []):
                if condition["status"] != "True":
                    why = ": ".join(filter(None, (condition.get("reason"), condition.get("message"))))
                    parts.append(f"{condition['type']}={condition['status']}" + (f" ({why})" if why else ""))
            for container in status.get("containerStatuses", []):
                for state, detail in container.get("state", {}).items():
                    why = ": ".join(filter(None, (detail.get("reason"), detail.get("message"))))
                    parts.append(f"container {container['name']} {state}" + (f" ({why})" if why else ""))
                parts.append(f"{container.get('restartCount', 0)} restarts")
            logs = sorted((self.state_dir / "pod-logs").glob(f"kube-system_{name}_*/{COREDNS_NAME}/*.log"))
            log_tail = f"last lines of {logs[-1]}:\n{tail(logs[-1], 20)}" if logs else "no container log yet"
            described.append(f"{', '.join(parts)}; {log_tail}")
        return "\n".join(described)

    def _setup_host_network(self, apiserver_port: int) -> None:
        """The bridge with the node's address, and the rule that pods reach only this cluster's addresses."""
        if not Path(f"/sys/class/net/{NODE_BRIDGE}").exists():
            run_host(["ip", "link", "add", NODE_BRIDGE, "type", "bridge"])
        run_host(["ip", "addr", "replace", f"{NODE_IP}/{POD_CIDR.split('/')[1]}", "dev", NODE_BRIDGE])
        run_host(["ip", "link", "set", NODE_BRIDGE, "up"])
        # Bridged pod traffic passes iptables (kube-proxy's Service rules, kube-router's policies), and
        # only this bridge routes (Services' replies go back out of it): the host's own forwarding stays.
        write_sysctl("net/bridge/bridge-nf-call-iptables", "1")
        write_sysctl(f"net/ipv4/conf/{NODE_BRIDGE}/forwarding", "1")
        # Before any NAT, so the destination is the pod's own choice: a pod, a Service, or the API server.
        chain = NODE_IPTABLES_CHAIN
        run_host(["iptables", "-w", "-t", "mangle", "-N", chain])
        for rule in (
            ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"],
            ["-d", NODE_IP, "-p", "tcp", "--dport", str(apiserver_port), "-j", "RETURN"],
            ["-d", NODE_IP, "-j", "DROP"],
            ["-d", POD_CIDR, "-j", "RETURN"],
            ["-d", SERVICE_CIDR, "-j", "RETURN"],
            ["-j", "DROP"],
        ):
            run_host(["iptables", "-w", "-t", "mangle", "-A", chain, *rule])
        run_host(["iptables", "-w", "-t", "mangle", "-I", "PREROUTING", "1", "-i", NODE_BRIDGE, "-j", chain])
        # kube-router REJECTs what a policy denies (icmp-port-unreachable, not configurable), where Calico or
        # Cilium drop it: the host drops the port-unreachables it sends itself to a pod about a connection whose
        # destination, after any Service's DNAT, is a pod or the node (the reply's source), so a denied connection
        # times out. Not matched: kube-proxy's REJECT of a Service without endpoints (the reply's source is the
        # ClusterIP), and what pods send (a closed port's TCP RST, a pod's own ICMP), which is bridged, not sent here.
        run_host(["iptables", "-w", "-t", "mangle", "-N", NODE_REJECTS_CHAIN])
        about_a_pod = ["-m", "conntrack", "--ctstate", "RELATED", "--ctreplsrc", POD_CIDR]
        run_host(["iptables", "-w", "-t", "mangle", "-A", NODE_REJECTS_CHAIN, *about_a_pod, "-j", "DROP"])
        to_pods = ["-o", NODE_BRIDGE, "-d", POD_CIDR, "-p", "icmp", "--icmp-type", "port-unreachable"]
        run_host(["iptables", "-w", "-t", "mangle", "-I", "OUTPUT", "1", *to_pods, "-j", NODE_REJECTS_CHAIN])
        # Nothing from the pod network is forwarded out of any interface but the bridge. What PODS lets through
        # to a ClusterIP that no Service rule DNATs (a Service without endpoints, a port or address no Service
        # has) is routed by the host's default route: kube-proxy's REJECT of a Service without endpoints is in
        # the filter FORWARD chain, after kube-router's jump, which it keeps first and whose chains ACCEPT what
        # the policies allow. REJECT exists in the filter table only, so this drops, in mangle FORWARD, which
        # the netfilter hook runs before filter FORWARD and nothing else of the node writes to: such a
        # connection times out (as a denied one does here) and no packet leaves the host.
        run_host(["iptables", "-w", "-t", "mangle", "-N", NODE_FORWARD_CHAIN])
        run_host(["iptables", "-w", "-t", "mangle", "-A", NODE_FORWARD_CHAIN, "-j", "DROP"])
        off_the_bridge = ["-s", POD_CIDR, "!", "-o", NODE_BRIDGE]
        run_host(["iptables", "-w", "-t", "mangle", "-I", "FORWARD", "1", *off_the_bridge, "-j", NODE_FORWARD_CHAIN])
        # The API server listens on every address (see its --bind-address): only loopback and pods get in.
        run_host(["iptables", "-w", "-N", NODE_API_CHAIN])
        for rule in (["-i", "lo", "-j", "RETURN"], ["-i", NODE_BRIDGE, "-j", "RETURN"], ["-j", "DROP"]):
            run_host(["iptables", "-w", "-A", NODE_API_CHAIN, *rule])
        run_host(
            ["iptables", "-w", "-I", "INPUT", "1", "-p", "tcp", "--dport", str(apiserver_port), "-j", NODE_API_CHAIN]
        )

    def _teardown_node(self) -> None:
        """Undo what the real node did to the host: containers, mounts, iptables, bridge, cgroups, sysctls.

        Runs after the node's processes are stopped; safe to run again, and a no-op without a real node.
        """
        if not self.node_marker.is_file():
            return
        recorded = json.loads(self.node_marker.read_text())
        for hierarchy in cgroup_hierarchies():  # the containers: every process in the kubelet's cgroups
            kill_cgroup_tree(hierarchy / NODE_CGROUP_ROOT)
        for pid in pids_mentioning(f"-address {self.containerd_socket}"):  # the shims: in no pod cgroup
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unmount_under(self.state_dir)
        remove_node_iptables()
        if Path(f"/sys/class/net/{NODE_BRIDGE}").exists():
            run_host(["ip", "link", "del", NODE_BRIDGE], check=False)
        for hierarchy in cgroup_hierarchies():
            remove_cgroup_tree(hierarchy / NODE_CGROUP_ROOT)
        for key, value in recorded["sysctls"].items():
            if value is not None and read_sysctl(key) != value:
                write_sysctl(key, value)
        for cached in Path("/var/lib/cni/results").glob(f"{CNI_NETWORK}-*"):  # libcni's cache of our pods
            cached.unlink(missing_ok=True)
        record = _owner_record()
        if record is not None and record[0] == self.state_dir:
            NODE_OWNER_FILE.unlink(missing_ok=True)
        self.node_marker.unlink()

    def _spawn(
        self, name: str, args: list[str], *, binary: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        assert self._bin is not None
        logfile = (self.state_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [str(binary or self._bin / name), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            cwd=self.state_dir,
            start_new_session=True,
            preexec_fn=_die_with_parent if self.attached else None,  # noqa: PLW1509 - prctl only
        )
        logfile.close()
        self._processes[name] = process
        self.pid_file.write_text(json.dumps({n: p.pid for n, p in self._processes.items()}, indent=1))

    def _wait(self, name: str, ready: Callable[[], bool], describe: Callable[[], str] | None = None) -> None:
        """Until ready() is true; else raise with the last lines of name's log, or with describe()'s text."""
        deadline = time.monotonic() + self.ready_timeout
        logfile = self.state_dir / f"{name}.log"
        while time.monotonic() < deadline:
            for other, process in self._processes.items():
                if process.poll() is not None:
                    self._raise_exited(other, process.returncode)
            with contextlib.suppress(OSError, LocalClusterError):
                if ready():
                    return
            time.sleep(0.2)
        detail = describe() if describe is not None else f"last lines of {logfile}:\n{tail(logfile)}"
        raise LocalClusterError(f"{name} not ready after {self.ready_timeout:.0f}s; {detail}")

    def _raise_exited(self, name: str, code: int) -> None:
        logfile = self.state_dir / f"{name}.log"
        text = tail(logfile)
        if re.search(r"address already in use", text, re.IGNORECASE):
            raise PortInUseError(f"{name} could not bind its port (address already in use)")
        raise LocalClusterError(f"{name} exited with code {code}; last lines of {logfile}:\n{text}")

    def _nodes_ready(self) -> bool:
        nodes = json.loads(self._api("GET", "/api/v1/nodes"))["items"]
        ready = [
            node
            for node in nodes
            if any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))
        ]
        return len(ready) >= FAKE_NODE_COUNT

    def _write_kubeconfig(self, target: Path, stem: str) -> None:
        # JSON is YAML: kubectl, client-go and the Python client all read it.
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "localcluster",
            "preferences": {},
            "clusters": [
                {
                    "name": "localcluster",
                    "cluster": {
                        "server": self._server,
                        "certificate-authority": str(self.pki.path("ca.crt")),
                    },
                }
            ],
            "users": [
                {
                    "name": stem,
                    "user": {
                        "client-certificate": str(self.pki.path(f"{stem}.crt")),
                        "client-key": str(self.pki.path(f"{stem}.key")),
                    },
                }
            ],
            "contexts": [{"name": "localcluster", "context": {"cluster": "localcluster", "user": stem}}],
        }
        target.write_text(json.dumps(config, indent=2))
        target.chmod(0o600)

    def _admin_opener(self) -> urllib.request.OpenerDirector:
        context = ssl.create_default_context(cafile=str(self.pki.path("ca.crt")))
        context.load_cert_chain(str(self.pki.path("admin.crt")), str(self.pki.path("admin.key")))
        return _loopback_opener(urllib.request.HTTPSHandler(context=context))

    def _api(self, method: str, path: str, body: dict[str, Any] | None = None) -> str:
        """One request to the API server as the admin; returns the body, raises on an HTTP error."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 - https to our own loopback server
            self._server + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with self._admin_opener().open(request, timeout=10) as response:
                return str(response.read().decode())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise LocalClusterError(f"{method} {path}: HTTP {error.code}: {detail}") from error

    def _api_ok(self, path: str) -> bool:
        self._api("GET", path)
        return True

    @staticmethod
    def _http_ok(url: str, expected: str) -> bool:
        with _loopback_opener().open(url, timeout=2) as response:
            return expected in response.read().decode()

    def _read_pids(self) -> dict[str, int]:
        try:
            return {str(name): int(pid) for name, pid in json.loads(self.pid_file.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _is_ours(self, pid: int) -> bool:
        """Alive and started for this state dir (every component gets paths in it), not a reused pid."""
        return _alive(pid) and str(self.state_dir) in _cmdline(pid)

    def _chain_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            self.stop()
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                # Die of the signal as if we had never handled it, so the parent sees the usual status.
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(signal.SIGTERM, on_sigterm)


# --------------------------------------------------------------------------------------------- CLI


def _iter_status(cluster: LocalCluster) -> Iterator[str]:
    for name, running in cluster.status().items():
        yield f"{name:<24} {'running' if running else 'not running'}"
    yield f"{'api server':<24} {'ready at ' + cluster.server if cluster.is_ready() else 'not ready'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("command", choices=["build", "start", "stop", "status", "kubeconfig", "import-image"])
    parser.add_argument("image", nargs="?", type=Path, help="import-image: an OCI or docker-archive tarball")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"where certs, data, logs and the kubeconfig go (default {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--real-node",
        action="store_true",
        help="build or start the real node too (needs root and node-setup.sh's packages)",
    )
    args = parser.parse_args(argv)
    if (args.command == "import-image") != (args.image is not None):
        parser.error("an image tarball goes with import-image, and only with it")
    cluster = LocalCluster(args.state_dir, attached=False, real_node=args.real_node)
    try:
        if args.command == "build":
            print(build())
            if args.real_node:
                print(build_node())
        elif args.command == "import-image":
            cluster.import_image(args.image)
        elif args.command == "start":
            if cluster.is_ready() and all(cluster.status().values()):
                log(f"already running; KUBECONFIG={cluster.kubeconfig}")
            else:
                cluster.start()
            print(cluster.kubeconfig)
        elif args.command == "stop":
            cluster.stop()
        elif args.command == "status":
            print("\n".join(_iter_status(cluster)))
            return 0 if cluster.is_ready() else 1
        else:
            print(cluster.kubeconfig)
    except LocalClusterError as error:
        print(f"localcluster: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

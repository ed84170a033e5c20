#!/usr/bin/env python3
"""Build and run a real local Kubernetes control plane on loopback, without Docker.

Components: etcd, kube-apiserver (RBAC on), kube-controller-manager, kube-scheduler, all built from the
published Go modules (see go.mod, gen-replace.py), and kwok (its own module under kwok/), which turns a
few Node objects into fake nodes that "run" scheduled pods. Binaries are cached outside the repository in
``${RUNBOOK_CACHE_DIR:-~/.cache/runbook-operator}/localcluster/bin-<hash of the module files>/``.

CLI::

    python tools/localcluster/localcluster.py build|start|stop|status|kubeconfig [--state-dir DIR]

``start`` detaches: the components keep running after it returns (PIDs in ``DIR/pids.json``) until
``stop``. From Python (pytest), ``with LocalCluster(state_dir) as cluster:`` stops everything on exit,
on SIGTERM, at interpreter exit, and (via PR_SET_PDEATHSIG) when the Python process is killed.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import datetime
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
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


def bin_dir() -> Path:
    digest = hashlib.sha256()
    for path in BUILD_INPUTS:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return cache_root() / f"bin-{digest.hexdigest()[:12]}"


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
    match = re.search(r"k8s\.io/kubernetes\s+(v\d+\.\d+\.\d+)", (HERE / "go.mod").read_text())
    if match is None:
        raise LocalClusterError(f"{HERE / 'go.mod'} does not require k8s.io/kubernetes")
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


def build() -> Path:
    """Build the binaries unless the cache already has them for the current module files."""
    target = bin_dir()
    if all((target / name).is_file() for name in BINARIES):
        return target
    cache_root().mkdir(parents=True, exist_ok=True)
    with (cache_root() / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building the same binaries
        if all((target / name).is_file() for name in BINARIES):
            return target
        go = find_go()
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        env = {**os.environ, "CGO_ENABLED": "0"}
        ldflags = version_ldflags(kubernetes_version())
        log(f"building {len(BINARIES)} binaries into {target} (the first build takes 10-30 minutes)")
        started = time.monotonic()
        for index, (name, (module, package)) in enumerate(BINARIES.items(), start=1):
            log(f"[{index}/{len(BINARIES)}] go build {package}")
            step = time.monotonic()
            result = subprocess.run(
                [go, "build", "-p", "2", "-trimpath", f"-ldflags={ldflags}", "-o", partial / name, package],
                cwd=module,
                env=env,
                check=False,
            )
            if result.returncode != 0:
                raise LocalClusterError(f"building {name} from {package} failed (exit {result.returncode})")
            log(f"[{index}/{len(BINARIES)}] {name} done in {time.monotonic() - step:.0f}s")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        log(f"built everything in {time.monotonic() - started:.0f}s")
    return target


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

    def generate(self, client_identities: dict[str, tuple[str, str | None]]) -> None:
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
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.attached = attached
        self.audit_policy = audit_policy
        self.ready_timeout = ready_timeout
        self.port_picker = port_picker
        self.pki = Pki(self.state_dir / "pki")
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._bin: Path | None = None
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
        """Start every component and wait until the API server is ready and the fake nodes are Ready."""
        self._bin = build()
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
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        self.state_dir.mkdir(parents=True)

    # -- internals

    def _start_once(self) -> None:
        self.clean_stale()
        self.pki.generate(
            {
                "admin": ("runbook-localcluster-admin", "system:masters"),
                "controller-manager": ("system:kube-controller-manager", None),
                "scheduler": ("system:kube-scheduler", None),
                # kwok plays every node's kubelet and deletes terminating pods: simplest as an admin.
                "kwok": ("kwok", "system:masters"),
            }
        )
        etcd_client, etcd_peer, apiserver_port, kwok_port = (self.port_picker() for _ in range(4))
        self._server = f"https://127.0.0.1:{apiserver_port}"
        for stem in ("admin", "controller-manager", "scheduler", "kwok"):
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
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
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
                f"--controllers={','.join(CONTROLLERS)}",
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
                },
            )
        self._wait("kwok", self._nodes_ready)
        # The serviceaccount controller's first act proves the controller manager is working.
        self._wait(
            "kube-controller-manager",
            lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
        )

    def _spawn(self, name: str, args: list[str]) -> None:
        assert self._bin is not None
        logfile = (self.state_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [str(self._bin / name), *args],
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

    def _wait(self, name: str, ready: Callable[[], bool]) -> None:
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
        raise LocalClusterError(
            f"{name} not ready after {self.ready_timeout:.0f}s; last lines of {logfile}:\n{tail(logfile)}"
        )

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
    parser.add_argument("command", choices=["build", "start", "stop", "status", "kubeconfig"])
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"where certs, data, logs and the kubeconfig go (default {DEFAULT_STATE_DIR})",
    )
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.state_dir, attached=False)
    try:
        if args.command == "build":
            print(build())
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

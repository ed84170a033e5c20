"""Scale and steady state: thousands of objects on one operator (issue 14's "Must show").

On one cluster, with the operator as its own process (`runbook-operator run`, cluster-wide, as the shipped
ServiceAccount with the shipped RBAC) and, in the same run, the same client creating the same children directly:

1. N BackupPolicies (over --namespaces namespaces) -> N CronJobs: time until a watch has seen every CronJob,
   against creating N copies of the operator's CronJob directly; the operator's API requests per policy.
2. P ScalingProfiles -> P HorizontalPodAutoscalers, against creating the HPAs directly.
3. I EmergencyIsolations created at once, one per namespace: create -> emergency-isolate NetworkPolicy seen
   by a watch, p50/p95, against creating that NetworkPolicy directly at once in I namespaces.
4. Idle for --idle-seconds with all of them in place: the operator's writes and reads (non-watch) from the
   API server's audit log, filtered by the operator's user; its CPU (/proc/<pid>/stat); its RSS at 0 CRs, at
   N BackupPolicies and its peak; zombie processes under it after the run. The operator runs as a child
   subreaper (PR_SET_CHILD_SUBREAPER): orphaned grandchildren (a gpg-agent that daemonized) are re-parented
   to it as they are to the operator as PID 1 in its image, so what it does not reap is counted here.

    .venv/bin/python bench/scale.py                      # the full run: 1,000 / 200 / 100, idle 180 s
    .venv/bin/python bench/scale.py --policies 50 --profiles 20 --isolations 10 --idle-seconds 20   # quick

Without --kubeconfig (or $RUNBOOK_BENCH_KUBECONFIG) a local control plane with an audit log is started for
the run; with it, the API request counts need --audit-log (the API server's JSON audit log, at least
Metadata level for the operator's user) and are reported n/a otherwise. Prints a table (figure, operator,
baseline, ratio, target, pass/fail); exits non-zero only on errors, not on missed targets.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import kubernetes
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT / "tools" / "localcluster"))

from tests.helpers import enable_namespace, image_env, server_side_apply, token_kubeconfig  # noqa: E402
from tests.integration.conftest import grant  # noqa: E402
from tests.services import GpgKeyring, S3Server  # noqa: E402

from isolation_latency import install_crds, percentile  # noqa: E402
from runbook_operator.builders.backup import cronjob_name  # noqa: E402
from runbook_operator.builders.isolation import POLICY_NAME  # noqa: E402
from runbook_operator.models import GROUP, VERSION  # noqa: E402

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
READ_VERBS = frozenset({"get", "list"})
PLURALS = ("backuppolicies", "scalingprofiles", "emergencyisolations")
BENCH_LABEL = "runbook.dev/bench"
# A schedule that does not fire during the run: the CronJob controller would otherwise start N Jobs.
SCHEDULE = "17 3 1 1 *"
DB_HOST, DB_PORT = "127.0.0.1", 5432  # granted, never connected to: the reconcile does not reach the database


def operator_identity() -> tuple[list[dict[str, Any]], str, str]:
    """deploy/base's namespace, ServiceAccount, ClusterRoles and bindings; the account's namespace and name."""
    documents = [
        doc
        for name in ("namespace.yaml", "rbac.yaml", "agent-rbac.yaml")
        for doc in yaml.safe_load_all((ROOT / "deploy" / "base" / name).read_text())
        if doc
    ]
    account = next(doc for doc in documents if doc["kind"] == "ServiceAccount")["metadata"]
    return documents, account["namespace"], account["name"]


def audit_policy(user: str) -> str:
    """Metadata-level audit events of the operator's requests only (a small log), nothing else."""
    policy = {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [{"level": "Metadata", "users": [user]}, {"level": "None"}],
    }
    return yaml.safe_dump(policy)


@contextlib.contextmanager
def cluster(given: str | None, user: str) -> Iterator[tuple[Path, Path | None]]:
    """(kubeconfig, audit log or None): the given cluster's, or a local control plane's with an audit log."""
    if given:
        yield Path(given), None
        return
    import localcluster

    with (
        tempfile.TemporaryDirectory(prefix="bench-scale-") as state,
        localcluster.LocalCluster(state, audit_policy=audit_policy(user)) as local,
    ):
        yield local.kubeconfig, local.audit_log


# ------------------------------------------------------------------------------------------- audit log


@dataclass(frozen=True)
class Request:
    at: float  # epoch seconds the API server received it
    verb: str
    resource: str
    code: int


class AuditLog:
    """The operator's requests as the API server recorded them (ResponseComplete events of its user)."""

    def __init__(self, path: Path | None, user: str) -> None:
        self.path, self.user = path, user
        self.offset = 0
        self.requests: list[Request] = []
        self.watches: set[str] = set()  # resources the operator has started a watch on

    @property
    def available(self) -> bool:
        return self.path is not None

    def refresh(self) -> None:
        if self.path is None or not self.path.exists():
            return
        with self.path.open("rb") as log:
            log.seek(self.offset)
            data = log.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            event = json.loads(line)
            if event.get("user", {}).get("username") != self.user:
                continue
            resource = (event.get("objectRef") or {}).get("resource", event.get("requestURI", "?"))
            if event["verb"] == "watch":
                self.watches.add(resource)
                continue
            if event["stage"] != "ResponseComplete":
                continue
            at = datetime.fromisoformat(event["requestReceivedTimestamp"]).timestamp()
            code = int((event.get("responseStatus") or {}).get("code", 0))
            self.requests.append(Request(at, event["verb"], resource, code))

    def between(self, start: float, end: float) -> list[Request]:
        self.refresh()
        return [r for r in self.requests if start <= r.at < end]

    @staticmethod
    def split(requests: Iterable[Request]) -> tuple[list[Request], list[Request]]:
        requests = list(requests)
        return [r for r in requests if r.verb in WRITE_VERBS], [r for r in requests if r.verb in READ_VERBS]

    @staticmethod
    def summary(requests: list[Request], top: int = 6) -> str:
        counts = Counter(f"{r.verb} {r.resource} {r.code}" for r in requests)
        return ", ".join(f"{what}: {n}" for what, n in counts.most_common(top)) or "none"

    def last_write(self) -> float:
        self.refresh()
        return max((r.at for r in self.requests if r.verb in WRITE_VERBS), default=0.0)


# -------------------------------------------------------------------------------------------- operator


def _subreaper() -> None:
    """Runs in the operator's process before exec: orphaned descendants are re-parented to it (as to PID 1),
    and it dies with the bench."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command name) of every process."""
    table: dict[int, tuple[int, str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            table[int(entry.name)] = (int(fields[1]), fields[0], comm)
    return table


def control_plane_cpu(kubeconfig: Path) -> float | None:
    """User + system seconds of the local control plane's kube-apiserver and etcd (their pids in the state
    directory beside the kubeconfig), None for a cluster the bench did not start."""
    pids = kubeconfig.parent / "pids.json"
    if not pids.exists():
        return None
    total = 0.0
    for name, pid in json.loads(pids.read_text()).items():
        if name in ("kube-apiserver", "etcd"):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


class Operator:
    """`runbook-operator run` (cluster-wide) as its own process, a child subreaper."""

    def __init__(self, kubeconfig: Path, log: Path, env: dict[str, str]) -> None:
        script = Path(sys.executable).parent / "runbook-operator"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "runbook_operator.cli"]
        # the operator of this checkout (an export of a commit too), not whichever one the venv was installed from
        path = os.pathsep.join(p for p in (str(ROOT / "operator"), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, **image_env(), **env}  # as in its image (its malloc settings count in the RSS figures)
        env |= {"KUBECONFIG": str(kubeconfig), "RUNBOOK_METRICS_PORT": "0", "PYTHONPATH": path}
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [*command, "run", "--health-port", "0"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_subreaper,  # noqa: PLW1509 - prctl only
            )
        self.pid = self.process.pid
        self.peak_seen = 0.0

    def alive(self) -> None:
        if self.process.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"the operator exited with {self.process.returncode}; log {self.log}:\n{tail}")

    def cpu_seconds(self) -> float:
        """User + system time of the operator and of the children it has waited for."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return sum(int(v) for v in fields[11:15]) / CLOCK_TICKS

    def memory_mib(self, key: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {key} in /proc/{self.pid}/status")

    def sample(self) -> float:
        rss = self.memory_mib()
        self.peak_seen = max(self.peak_seen, rss)
        return rss

    def descendants(self) -> list[tuple[int, str, str]]:
        """(pid, state, command) of every process below the operator."""
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (parent, _, _) in table.items():
            children.setdefault(parent, []).append(pid)
        found, todo = [], list(children.get(self.pid, []))
        while todo:
            pid = todo.pop()
            found.append((pid, table[pid][1], table[pid][2]))
            todo += children.get(pid, [])
        return found

    def log_count(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# ---------------------------------------------------------------------------------------------- watches


class Arrivals:
    """A cluster-wide watch of one kind from its own client: when it first saw each (namespace, name) (ADDED),
    and each object's latest ``status.phase``."""

    def __init__(self, kubeconfig: Path, api_class: Any, method: str, *args: str) -> None:
        self.client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self.list, self.args = getattr(api_class(self.client), method), args
        self.seen: dict[tuple[str, str], float] = {}
        self.phase: dict[tuple[str, str], str] = {}
        self.lock = threading.Condition()
        self.failure: BaseException | None = None
        self.reconnects = 0
        listed = json.loads(self.list(*args, limit=1, _preload_content=False).data)
        threading.Thread(target=self._run, args=(listed["metadata"]["resourceVersion"],), daemon=True).start()

    def _run(self, version: str) -> None:
        """Watch from ``version``; when the API server ends the watch (it drops a watcher that falls behind),
        watch again from the last version seen, or after 410 Gone list again (objects first seen in that list
        count as arrived then: at most the reconnect's delay late)."""
        try:
            while True:
                try:
                    stream = kubernetes.watch.Watch().stream(
                        self.list, *self.args, resource_version=version, timeout_seconds=3600, deserialize=False
                    )
                    for event in stream:
                        version = self._record(event["type"], event["object"])
                except kubernetes.client.ApiException as error:
                    if error.status != 410:
                        raise
                    listed = json.loads(self.list(*self.args, _preload_content=False).data)
                    for obj in listed["items"]:
                        self._record("ADDED", obj)
                    version = listed["metadata"]["resourceVersion"]
                with self.lock:
                    self.reconnects += 1
        except BaseException as error:
            with self.lock:
                self.failure = error
                self.lock.notify_all()

    def _record(self, kind: str, obj: dict[str, Any]) -> str:
        now = time.monotonic()
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        with self.lock:
            if kind == "ADDED":
                self.seen.setdefault(key, now)
            self.phase[key] = (obj.get("status") or {}).get("phase") or "none"
            self.lock.notify_all()
        return str(obj["metadata"]["resourceVersion"])

    def _until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not done():
                if self.failure is not None:
                    raise RuntimeError(f"watch failed: {self.failure}") from self.failure
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.lock.wait(min(left, 1.0))

    def wait(self, keys: Iterable[tuple[str, str]], timeout: float) -> dict[tuple[str, str], float]:
        """The arrival times of ``keys`` seen within ``timeout`` seconds (all of them, or fewer on timeout)."""
        wanted = set(keys)
        self._until(lambda: wanted <= self.seen.keys(), timeout)
        with self.lock:
            return {key: self.seen[key] for key in wanted if key in self.seen}

    def wait_phase(self, keys: Iterable[tuple[str, str]], phase: str, timeout: float) -> Counter[str]:
        """The phases of ``keys`` once all are in ``phase``, or after ``timeout`` seconds."""
        wanted = set(keys)
        self._until(lambda: all(self.phase.get(key) == phase for key in wanted), timeout)
        with self.lock:
            return Counter(self.phase.get(key, "unseen") for key in wanted)


# ------------------------------------------------------------------------------------------------ table


@dataclass
class Row:
    figure: str
    operator: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    passed: bool | None = None  # None: no target, or not measurable here


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *args: Any, **kwargs: Any) -> None:
        self.rows.append(Row(*args, **kwargs))
        row = self.rows[-1]
        print(f"  {row.figure}: {row.operator}" + (f" (baseline {row.baseline})" if row.baseline else ""), flush=True)

    def print(self) -> None:
        headers = ("figure", "operator", "baseline", "ratio", "target", "")
        cells = [
            (r.figure, r.operator, r.baseline, r.ratio, r.target, {True: "pass", False: "FAIL", None: ""}[r.passed])
            for r in self.rows
        ]
        widths = [max(len(str(c[i])) for c in [headers, *cells]) for i in range(len(headers))]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        print()
        print(line.format(*headers))
        print("  ".join("-" * w for w in widths))
        for c in cells:
            print(line.format(*c))
        for note in self.notes:
            print(f"- {note}")


def seconds(value: float) -> str:
    return f"{value:.2f} s"


def millis(value: float) -> str:
    return f"{value * 1000:.0f} ms"


def ratio(operator: float, baseline: float) -> str:
    return f"{operator / baseline:.1f}x" if baseline > 0 else "n/a"


# ------------------------------------------------------------------------------------------------- bench


class Bench:
    def __init__(self, args: argparse.Namespace, kubeconfig: Path, audit: AuditLog, workdir: Path) -> None:
        self.args, self.kubeconfig, self.audit, self.workdir = args, kubeconfig, audit, workdir
        self.run_id = uuid.uuid4().hex[:5]
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        configuration.connection_pool_maxsize = max(args.threads, args.isolations) + 4  # every thread its own
        self.api = kubernetes.client.ApiClient(configuration)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.apps = kubernetes.client.AppsV1Api(self.api)
        self.batch = kubernetes.client.BatchV1Api(self.api)
        self.autoscaling = kubernetes.client.AutoscalingV2Api(self.api)
        self.net = kubernetes.client.NetworkingV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.report = Report()
        self.namespaces: list[str] = []

    # -- helpers

    def parallel(self, items: Iterable[Any], action: Callable[[Any], Any], threads: int | None = None) -> list[Any]:
        with ThreadPoolExecutor(max_workers=threads or self.args.threads) as pool:
            return list(pool.map(action, items))

    def namespace(self, role: str, index: int) -> str:
        name = f"scale-{self.run_id}-{role}-{index}"
        self.core.create_namespace({"metadata": {"name": name, "labels": {BENCH_LABEL: self.run_id}}})
        self.namespaces.append(name)
        return name

    @staticmethod
    def create(call: Callable[..., Any], *args: Any) -> None:
        """One create, its answer read but not turned into the client's models (the same cost for every kind)."""
        call(*args, _preload_content=False).data  # noqa: B018 - reads the body, returning the connection

    def cr(self, namespace: str, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}

    def wait_phase(self, plural: str, keys: list[tuple[str, str]], phase: str, start: float) -> float | None:
        """Seconds from ``start`` until every one of ``keys`` is in ``phase``, None after the timeout."""
        phases = self.crs[plural].wait_phase(keys, phase, self.args.timeout)
        self.operator.alive()
        if phases[phase] == len(keys):
            return time.monotonic() - start
        self.report.notes.append(f"{plural}: not all {phase} after {self.args.timeout:.0f} s: {dict(phases)}")
        return None

    def created_to_seen(
        self, watch: Arrivals, keys: list[tuple[str, str]], create: Callable[[tuple[str, str]], None]
    ) -> tuple[float, int]:
        """Create every key (threads), wait until the watch saw each of ``keys``: (seconds, how many seen)."""
        start = time.monotonic()
        self.parallel(keys, create)
        arrived = watch.wait(keys, self.args.timeout)
        end = max(arrived.values(), default=time.monotonic())
        return end - start, len(arrived)

    @staticmethod
    def clone(obj: Any, api: kubernetes.client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
        """The object as its creator sent it: spec and labels, no server fields, no owner."""
        body: dict[str, Any] = api.sanitize_for_serialization(obj)
        body.pop("status", None)
        # no operator labels either: nothing of the operator's may take it for its own
        body["metadata"] = {"name": name, "namespace": namespace, "labels": {BENCH_LABEL: "direct"}}
        return body

    # -- setup

    def prepare(self) -> None:
        args = self.args
        documents, self.account_namespace, account = operator_identity()
        server_side_apply(self.api, documents)
        token = self.core.create_namespaced_service_account_token(
            account, self.account_namespace, {"spec": {"expirationSeconds": 6 * 3600}}
        ).status.token
        self.operator_kubeconfig = token_kubeconfig(self.kubeconfig, token, self.workdir / "operator.kubeconfig")
        install_crds(self.api)
        for plural in PLURALS:  # Established is not yet servable for a moment (429)
            for attempt in range(120):
                try:
                    self.custom.list_cluster_custom_object(GROUP, VERSION, plural, limit=1)
                    break
                except kubernetes.client.ApiException:
                    if attempt == 119:
                        raise
                    time.sleep(0.5)
        self.s3 = S3Server().start()
        self.keyring = GpgKeyring(self.workdir / "gpg").start()
        started = time.monotonic()
        spread = min(args.namespaces, max(1, args.policies))
        self.bp_namespaces = self.parallel(range(spread), lambda i: self.namespace("bp", i))
        self.sp_namespaces = self.parallel(range(min(args.namespaces, max(1, args.profiles))), self.sp_namespace)
        self.ei_namespaces = self.parallel(range(args.isolations), lambda i: self.namespace("ei", i))
        self.parallel(self.sp_namespaces + self.ei_namespaces, lambda ns: enable_namespace(self.api, ns))
        self.parallel(self.bp_namespaces, self.enable_granted)
        self.parallel(self.bp_namespaces, self.bp_references)
        self.direct_bp = self.parallel(range(spread), lambda i: self.namespace("direct-bp", i))
        self.direct_sp = self.parallel(range(len(self.sp_namespaces)), lambda i: self.namespace("direct-sp", i))
        self.direct_ei = self.parallel(range(args.isolations), lambda i: self.namespace("direct-ei", i))
        print(f"setup: {len(self.namespaces)} namespaces in {time.monotonic() - started:.0f} s", flush=True)
        self.cronjobs = Arrivals(self.kubeconfig, kubernetes.client.BatchV1Api, "list_cron_job_for_all_namespaces")
        self.hpas = Arrivals(
            self.kubeconfig, kubernetes.client.AutoscalingV2Api, "list_horizontal_pod_autoscaler_for_all_namespaces"
        )
        self.policies = Arrivals(
            self.kubeconfig, kubernetes.client.NetworkingV1Api, "list_network_policy_for_all_namespaces"
        )
        self.crs = {
            plural: Arrivals(
                self.kubeconfig,
                kubernetes.client.CustomObjectsApi,
                "list_cluster_custom_object",
                GROUP,
                VERSION,
                plural,
            )
            for plural in PLURALS
        }

    def enable_granted(self, namespace: str) -> None:
        """Enabled, and granted the database host and the S3 endpoint (as an administrator would)."""
        enable_namespace(self.api, namespace)
        grant(self.api, namespace, hosts=[(DB_HOST, DB_PORT)], endpoints=[self.s3.endpoint])

    def bp_references(self, namespace: str) -> None:
        secret = self.core.create_namespaced_secret
        secret(namespace, {"metadata": {"name": "db-credentials"}, "stringData": {"username": "u", "password": "p"}})
        secret(
            namespace,
            {
                "metadata": {"name": "backup-s3-credentials"},
                "stringData": {"AWS_ACCESS_KEY_ID": self.s3.access_key, "AWS_SECRET_ACCESS_KEY": self.s3.secret_key},
            },
        )
        self.core.create_namespaced_config_map(
            namespace, {"metadata": {"name": "backup-gpg-recipients"}, "data": {"team.asc": self.keyring.public_key}}
        )
        self.s3.client().create_bucket(Bucket=namespace)

    def sp_namespace(self, index: int) -> str:
        namespace = self.namespace("sp", index)
        per = -(-self.args.profiles // self.args.namespaces)
        for k in range(per):
            name = f"app-{k}"
            labels = {"app": name}
            # replicas 0: no pods, and the HPA controller leaves a workload at zero alone
            self.apps.create_namespaced_deployment(
                namespace,
                {
                    "metadata": {"name": name},
                    "spec": {
                        "replicas": 0,
                        "selector": {"matchLabels": labels},
                        "template": {
                            "metadata": {"labels": labels},
                            "spec": {"containers": [{"name": "app", "image": "app:1"}]},
                        },
                    },
                },
            )
        return namespace

    def policy_spec(self, namespace: str) -> dict[str, Any]:
        return {
            "source": {
                "postgresql": {
                    "host": DB_HOST,
                    "port": DB_PORT,
                    "database": "app",
                    "credentialsSecretRef": {"name": "db-credentials"},
                    "insecurePlaintext": True,
                }
            },
            "schedule": SCHEDULE,
            "destination": {
                "s3": {
                    "bucket": namespace,
                    "prefix": "postgresql",
                    "endpoint": self.s3.endpoint,
                    "credentialsSecretRef": {"name": "backup-s3-credentials"},
                    "serverSideEncryption": "None",
                }
            },
            "encryption": {
                "gpg": {
                    "recipientsConfigMapRef": {"name": "backup-gpg-recipients", "key": "team.asc"},
                    "fingerprints": [self.keyring.fingerprint],
                }
            },
        }

    # -- phases

    def start_operator(self) -> None:
        log = Path(tempfile.mkstemp(prefix="bench-scale-operator-", suffix=".log")[1])  # kept after the run
        env = {"RUNBOOK_LEADER_ELECTION": "true", "RUNBOOK_LEASE_NAMESPACE": self.account_namespace}
        self.operator = Operator(self.operator_kubeconfig, log, env if self.args.leader_election else {})
        print(f"operator: pid {self.operator.pid}, log {self.operator.log}", flush=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until it watches every kind (or, without an audit log, a while)
            self.operator.alive()
            self.audit.refresh()
            if self.audit.available and set(PLURALS) <= self.audit.watches:
                break
            if not self.audit.available and time.monotonic() > deadline - 105:
                break
            time.sleep(0.5)
        else:
            self.report.notes.append(f"the operator's watches not all seen in the audit log: {self.audit.watches}")
        time.sleep(5)
        self.rss_idle = self.operator.sample()

    def backup_policies(self) -> None:
        args = self.args
        keys = [(self.bp_namespaces[i % len(self.bp_namespaces)], f"db-{i}") for i in range(args.policies)]
        cronjob_of = {key: (key[0], cronjob_name(key[1])) for key in keys}
        print(f"BackupPolicies: creating {args.policies}", flush=True)
        wall = time.time()
        start, cpu, server = time.monotonic(), self.operator.cpu_seconds(), control_plane_cpu(self.kubeconfig)
        self.parallel(
            keys,
            lambda key: self.create(
                self.custom.create_namespaced_custom_object,
                GROUP,
                VERSION,
                key[0],
                "backuppolicies",
                self.cr(key[0], "BackupPolicy", key[1], self.policy_spec(key[0])),
            ),
        )
        created = time.monotonic() - start
        arrived = self.cronjobs.wait(cronjob_of.values(), args.timeout)
        took = max(arrived.values(), default=start) - start
        ready = self.wait_phase("backuppolicies", keys, "Scheduled", start)
        settled_wall = time.time()
        used = self.operator.cpu_seconds() - cpu
        served = control_plane_cpu(self.kubeconfig)
        self.rss_policies = self.operator.sample()
        writes, reads = AuditLog.split(self.audit.between(wall, settled_wall))

        # the baseline: the same client creates copies of the operator's CronJob, as many, as fast as it can
        namespace, name = cronjob_of[keys[0]]
        sample = self.batch.read_namespaced_cron_job(name, namespace)
        direct = [(self.direct_bp[i % len(self.direct_bp)], cronjob_name(f"db-{i}")) for i in range(args.policies)]
        direct_server = control_plane_cpu(self.kubeconfig)
        baseline, _ = self.created_to_seen(
            self.cronjobs,
            direct,
            lambda key: self.create(self.batch.create_namespaced_cron_job, key[0], self.clone(sample, self.api, *key)),
        )
        n = args.policies
        after = control_plane_cpu(self.kubeconfig)
        if server is not None and served is not None and direct_server is not None and after is not None:
            self.report.notes.append(
                f"kube-apiserver + etcd CPU per BackupPolicy (its create, the operator's requests, every watch): "
                f"{1000 * (served - server) / n:.1f} ms; per CronJob created directly: "
                f"{1000 * (after - direct_server) / n:.1f} ms"
            )
        complete = len(arrived) == n
        self.report.add(
            f"{n:,} BackupPolicies -> {n:,} CronJobs",
            seconds(took) if complete else f"timeout: {len(arrived)}/{n} in {args.timeout:.0f} s",
            seconds(baseline),
            ratio(took, baseline) if complete else "",
            "< 5x and < 15 s",
            complete and took < 5 * baseline and took < 15,
        )
        self.report.notes.append(f"creating the {n} BackupPolicies took the client {created:.2f} s")
        self.report.notes.append(
            f"the operator's CPU from the first BackupPolicy to all Scheduled: {used:.2f} s ({1000 * used / n:.1f} ms "
            "per policy)"
        )
        self.report.add(
            f"  ... all {n:,} BackupPolicies Scheduled",
            seconds(ready) if ready is not None else f"timeout ({args.timeout:.0f} s)",
        )
        if self.audit.available:
            self.report.add(
                "  API writes / reads per BackupPolicy (creation to Scheduled)",
                f"{len(writes) / n:.2f} / {len(reads) / n:.2f}",
                "1 / 0",
                target="<= 2 writes (+1 per namespace)",
                passed=len(writes) <= 2 * n + len(self.bp_namespaces),  # a CronJob, a status; a key
            )
            self.report.notes.append(f"operator writes during the BackupPolicy phase: {AuditLog.summary(writes)}")
            self.report.notes.append(f"operator reads during the BackupPolicy phase: {AuditLog.summary(reads)}")

    def scaling_profiles(self) -> None:
        args = self.args
        keys = [
            (self.sp_namespaces[i % len(self.sp_namespaces)], f"app-{i // len(self.sp_namespaces)}")
            for i in range(args.profiles)
        ]
        print(f"ScalingProfiles: creating {args.profiles}", flush=True)

        def create(key: tuple[str, str]) -> None:
            spec = {
                "targetRef": {"kind": "Deployment", "name": key[1]},
                "autoscaling": {"minReplicas": 2, "maxReplicas": 10, "cpuUtilization": 70, "memoryUtilization": 80},
            }
            self.create(
                self.custom.create_namespaced_custom_object,
                GROUP,
                VERSION,
                key[0],
                "scalingprofiles",
                self.cr(key[0], "ScalingProfile", key[1], spec),
            )

        took, seen = self.created_to_seen(self.hpas, keys, create)
        start = time.monotonic()
        self.wait_phase("scalingprofiles", keys, "Active", start)
        sample = self.autoscaling.read_namespaced_horizontal_pod_autoscaler(keys[0][1], keys[0][0])
        direct = [(self.direct_sp[i % len(self.direct_sp)], key[1]) for i, key in enumerate(keys)]
        baseline, _ = self.created_to_seen(
            self.hpas,
            direct,
            lambda key: self.create(
                self.autoscaling.create_namespaced_horizontal_pod_autoscaler, key[0], self.clone(sample, self.api, *key)
            ),
        )
        n = args.profiles
        self.report.add(
            f"{n:,} ScalingProfiles -> {n:,} HPAs",
            seconds(took) if seen == n else f"timeout: {seen}/{n} in {args.timeout:.0f} s",
            seconds(baseline),
            ratio(took, baseline) if seen == n else "",
        )

    def isolations(self) -> None:
        args = self.args
        n = args.isolations
        print(f"EmergencyIsolations: creating {n} at once", flush=True)

        def at_once(namespaces: list[str], create: Callable[[str], None]) -> dict[str, float]:
            barrier = threading.Barrier(len(namespaces))

            def one(namespace: str) -> tuple[str, float]:
                barrier.wait()
                start = time.monotonic()
                create(namespace)
                return namespace, start

            return dict(self.parallel(namespaces, one, threads=len(namespaces)))

        def isolation(namespace: str) -> None:
            spec = {"reason": "scale benchmark", "incidentId": f"BENCH-{namespace}", "evidence": {"capture": False}}
            self.create(
                self.custom.create_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                "emergencyisolations",
                self.cr(namespace, "EmergencyIsolation", "bench", spec),
            )

        # the client's connections first: 100 at once need 100 connections, and a TLS handshake for each new one
        # would be timed as the operator's (the baseline below finds them open)
        at_once(self.ei_namespaces, lambda namespace: self.core.read_namespace(namespace, _preload_content=False).data)
        starts = at_once(self.ei_namespaces, isolation)
        arrived = self.policies.wait([(ns, POLICY_NAME) for ns in self.ei_namespaces], args.timeout)
        latencies = [arrived[(ns, POLICY_NAME)] - start for ns, start in starts.items() if (ns, POLICY_NAME) in arrived]
        self.wait_phase(
            "emergencyisolations", [(ns, "bench") for ns in self.ei_namespaces], "Isolated", time.monotonic()
        )
        sample = self.net.read_namespaced_network_policy(POLICY_NAME, self.ei_namespaces[0])

        def policy(namespace: str) -> None:
            self.create(
                self.net.create_namespaced_network_policy,
                namespace,
                self.clone(sample, self.api, namespace, POLICY_NAME),
            )

        direct_starts = at_once(self.direct_ei, policy)
        direct_arrived = self.policies.wait([(ns, POLICY_NAME) for ns in self.direct_ei], args.timeout)
        direct = [direct_arrived[(ns, POLICY_NAME)] - start for ns, start in direct_starts.items()]
        if len(latencies) < n:
            self.report.add(f"{n} EmergencyIsolations at once: policy visible", f"timeout: {len(latencies)}/{n}")
            return
        p50, p95 = statistics.median(latencies), percentile(latencies, 0.95)
        d50, d95 = statistics.median(direct), percentile(direct, 0.95)
        # where the time goes: create -> the isolation visible to a watch (the API server), then -> its policy
        # visible (the operator's share: its watch event, kopf, the create, the policy's watch event)
        visible = self.crs["emergencyisolations"].wait([(ns, "bench") for ns in self.ei_namespaces], 0)
        served = [visible[(ns, "bench")] - start for ns, start in starts.items() if (ns, "bench") in visible]
        after = [arrived[(ns, POLICY_NAME)] - visible[(ns, "bench")] for ns in starts if (ns, "bench") in visible]
        if served and after:
            self.report.notes.append(
                "EmergencyIsolations: create -> the isolation visible to a watch p50 "
                f"{millis(statistics.median(served))}, p95 {millis(percentile(served, 0.95))}; "
                f"isolation visible -> its policy visible p50 {millis(statistics.median(after))}, "
                f"p95 {millis(percentile(after, 0.95))}"
            )
        self.report.add(
            f"{n} EmergencyIsolations at once: create -> policy, p50", millis(p50), millis(d50), ratio(p50, d50)
        )
        self.report.add(
            f"{n} EmergencyIsolations at once: create -> policy, p95",
            millis(p95),
            millis(d95),
            ratio(p95, d95),
            "< 250 ms",
            p95 < 0.25,
        )
        self.report.add("  ... max", millis(max(latencies)), millis(max(direct)), ratio(max(latencies), max(direct)))

    def settle(self) -> None:
        """Until the operator has made no write for 10 s (at most 90 s); without an audit log, 15 s."""
        if not self.audit.available:
            time.sleep(15)
            return
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if time.time() - self.audit.last_write() > 10:
                return
            time.sleep(1)
        self.report.notes.append("the operator was still writing 90 s after the last object was created")

    def idle(self) -> None:
        args = self.args
        total = args.policies + args.profiles + args.isolations
        print(f"idle: {args.idle_seconds:.0f} s with {total:,} CRs", flush=True)
        self.settle()
        wall, start, cpu = time.time(), time.monotonic(), self.operator.cpu_seconds()
        while time.monotonic() - start < args.idle_seconds:
            self.operator.alive()
            self.operator.sample()
            time.sleep(min(5.0, max(0.0, args.idle_seconds - (time.monotonic() - start))))
        elapsed, used = time.monotonic() - start, self.operator.cpu_seconds() - cpu
        end_wall = time.time()
        rss_end = self.operator.sample()
        peak = max(self.operator.peak_seen, self.operator.memory_mib("VmHWM"))
        what = f"idle {elapsed:.0f} s at {args.policies} BP + {args.profiles} SP + {args.isolations} EI"
        if self.audit.available:
            time.sleep(2)  # the audit log's last events
            writes, reads = AuditLog.split(self.audit.between(wall, end_wall))
            renewals = [w for w in writes if w.resource == "leases"]
            writes = [w for w in writes if w.resource != "leases"]
            if args.leader_election:
                self.report.notes.append(f"idle: {len(renewals)} Lease renewals, not counted as writes")
            self.report.add(f"{what}: API writes", str(len(writes)), "0", target="0", passed=not writes)
            rate = len(reads) / elapsed
            self.report.add(
                f"{what}: API reads (no watches)", f"{rate:.3f}/s ({len(reads)})", "0", target="< 1/s", passed=rate < 1
            )
            if writes:
                self.report.notes.append(f"idle writes: {AuditLog.summary(writes)}")
            if reads:
                self.report.notes.append(f"idle reads: {AuditLog.summary(reads)}")
        else:
            self.report.add(f"{what}: API writes / reads", "n/a (no audit log: give --audit-log)")
        share = 100 * used / elapsed
        self.report.add(f"{what}: operator CPU", f"{share:.2f} % of a core", target="< 3 %", passed=share < 3)
        self.report.add("operator RSS at 0 CRs", f"{self.rss_idle:.0f} MiB")
        self.report.add(
            f"operator RSS at {args.policies:,} BackupPolicies",
            f"{self.rss_policies:.0f} MiB",
            target="< 200 MiB",
            passed=self.rss_policies < 200,
        )
        self.report.add(f"operator RSS at {total:,} CRs (end of idle)", f"{rss_end:.0f} MiB")
        self.report.add("operator RSS peak", f"{peak:.0f} MiB")
        below = self.operator.descendants()
        zombies = [p for p in below if p[1] == "Z"]
        self.report.add(
            "zombie processes under the operator after the run",
            str(len(zombies)),
            target="0",
            passed=not zombies,
        )
        self.report.add("processes left under the operator after the run (alive or not)", str(len(below)))
        if below:
            counts = Counter(f"{comm} ({state})" for _, state, comm in below)
            self.report.notes.append(f"processes under the operator at the end: {dict(counts)}")
        watches = [self.cronjobs, self.hpas, self.policies, *self.crs.values()]
        if any(w.reconnects for w in watches):
            reconnects = ", ".join(str(w.reconnects) for w in watches)
            self.report.notes.append(f"the bench's watches reconnected (CronJobs, HPAs, policies, CRs): {reconnects}")
        pool_full = self.operator.log_count("Connection pool is full")
        self.report.notes.append(f"'Connection pool is full' in the operator's log: {pool_full} times")

    def cleanup(self) -> None:
        with contextlib.suppress(AttributeError):
            self.operator.stop()
        with contextlib.suppress(AttributeError):
            self.s3.stop()
        if self.args.kubeconfig:  # a local control plane goes away as a whole
            for namespace in self.namespaces:
                with contextlib.suppress(kubernetes.client.ApiException):
                    self.core.delete_namespace(namespace)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", default=os.environ.get("RUNBOOK_BENCH_KUBECONFIG"))
    parser.add_argument("--audit-log", type=Path, help="with --kubeconfig: that API server's JSON audit log")
    parser.add_argument("--policies", type=int, default=1000, help="BackupPolicies (default 1000)")
    parser.add_argument("--profiles", type=int, default=200, help="ScalingProfiles (default 200)")
    parser.add_argument("--isolations", type=int, default=100, help="EmergencyIsolations, one per namespace (100)")
    parser.add_argument("--idle-seconds", type=float, default=180, help="the idle window (default 180)")
    parser.add_argument("--namespaces", type=int, default=10, help="namespaces the policies and profiles spread over")
    parser.add_argument("--threads", type=int, default=16, help="the client's concurrent creates (default 16)")
    parser.add_argument("--timeout", type=float, default=300, help="longest wait for one phase, seconds")
    parser.add_argument(
        "--leader-election",
        action="store_true",
        help="run the operator with RUNBOOK_LEADER_ELECTION as deploy/ does (its Lease renewals are left out of "
        "the idle writes and reported apart)",
    )
    args = parser.parse_args()
    for name in ("policies", "profiles", "isolations", "namespaces", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")

    _, account_namespace, account = operator_identity()
    user = f"system:serviceaccount:{account_namespace}:{account}"
    began = time.monotonic()
    with (
        cluster(args.kubeconfig, user) as (kubeconfig, audit_path),
        tempfile.TemporaryDirectory(prefix="bench-scale-work-") as work,
    ):
        audit = AuditLog(args.audit_log if args.kubeconfig else audit_path, user)
        bench = Bench(args, kubeconfig, audit, Path(work))
        try:
            bench.prepare()
            bench.start_operator()
            bench.backup_policies()
            bench.scaling_profiles()
            bench.isolations()
            bench.idle()
        finally:
            bench.cleanup()
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
        )
        bench.report.notes.append(
            f"{ROOT} at {commit.stdout.strip() or '(not a git checkout)'}; "
            f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
            f"whole run {time.monotonic() - began:.0f} s"
        )
        bench.report.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

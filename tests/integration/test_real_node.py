"""The local cluster's real node runs pods for real: containers, Service DNS from a CoreDNS pod, and
NetworkPolicies that stop connections (they time out, as with a dropping implementation; a closed port is refused).

One cluster with ``real_node=True`` for the module (it needs root and tools/localcluster/node-setup.sh's
packages; its binaries build once into the cache, several minutes cold). Pods run the locally built test
image (``localcluster.TEST_IMAGE``: ``nettool serve|connect|lookup``). The last test stops the cluster and
checks that the host is left as it was.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

import localcluster

pytestmark = pytest.mark.integration

WaitFor = Callable[..., Any]
PORT = 8080


@pytest.fixture(scope="module")
def node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localcluster.LocalCluster]:
    cluster = localcluster.LocalCluster(tmp_path_factory.mktemp("realnode"), real_node=True)
    started = time.monotonic()
    cluster.start()
    print(f"real node cluster started in {time.monotonic() - started:.1f}s")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def core(node_cluster: localcluster.LocalCluster) -> kubernetes.client.CoreV1Api:
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(node_cluster.kubeconfig), client_configuration=config)
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(config))


@pytest.fixture(scope="module")
def networking(core: kubernetes.client.CoreV1Api) -> kubernetes.client.NetworkingV1Api:
    return kubernetes.client.NetworkingV1Api(core.api_client)


@pytest.fixture
def namespace(core: kubernetes.client.CoreV1Api, wait_for: WaitFor) -> Iterator[str]:
    name = f"realnode-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    # Pods need the namespace's default ServiceAccount, which the controller manager makes.
    wait_for(lambda: core.list_namespaced_service_account(name).items, what=f"{name}'s default ServiceAccount")
    yield name
    core.delete_namespace(name)


def pod(
    name: str, args: list[str], *, labels: dict[str, str] | None = None, image: str = localcluster.TEST_IMAGE
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent", "args": args}],
        },
    }


def run_to_end(
    core: kubernetes.client.CoreV1Api, namespace: str, wait_for: WaitFor, name: str, args: list[str]
) -> tuple[str, str]:
    """Run a one-shot nettool pod; its final phase and its log."""
    core.create_namespaced_pod(namespace, pod(name, args))
    phase = wait_for(
        lambda: (p := core.read_namespaced_pod(name, namespace).status.phase) in ("Succeeded", "Failed") and p,
        timeout=60,
        what=f"pod {name} to finish",
    )
    return str(phase), pod_log(core, namespace, name)


def pod_log(core: kubernetes.client.CoreV1Api, namespace: str, name: str) -> str:
    return str(core.read_namespaced_pod_log(name, namespace, _preload_content=False).data.decode())


def start_running(
    core: kubernetes.client.CoreV1Api, namespace: str, wait_for: WaitFor, name: str, labels: dict[str, str]
) -> str:
    """A long-running nettool server pod; returns its pod IP once it is Ready."""
    core.create_namespaced_pod(namespace, pod(name, ["serve", str(PORT)], labels=labels))

    def ready_ip() -> str | None:
        status = core.read_namespaced_pod(name, namespace).status
        ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
        return status.pod_ip if ready else None

    return str(wait_for(ready_ip, timeout=60, what=f"pod {name} Ready"))


def connect_from(
    cluster: localcluster.LocalCluster, namespace: str, client: str, ip: str, port: int = PORT
) -> subprocess.CompletedProcess[str]:
    """`nettool connect` from inside the running pod `client` (kubectl exec, through the kubelet)."""
    kubectl = localcluster.bin_dir() / "kubectl"
    return subprocess.run(
        [
            str(kubectl),
            f"--kubeconfig={cluster.kubeconfig}",
            "-n",
            namespace,
            "exec",
            client,
            "--",
            "/nettool",
            "connect",
            ip,
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_host_without_runc_is_told_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for tool in ("iptables", "iptables-restore", "ipset", "conntrack"):  # everything but runc
        (tmp_path / tool).symlink_to(shutil.which(tool) or "/bin/false")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(localcluster.LocalClusterError, match=r"needs runc on PATH: run .*node-setup\.sh"):
        localcluster.LocalCluster(tmp_path / "state", real_node=True).start()


def host_is_clean(state_dir: Path, hierarchies: list[Path]) -> None:
    """Nothing of a real node is left on the host: what test_stop_leaves_the_host_as_it_was checks."""
    assert not Path(f"/sys/class/net/{localcluster.NODE_BRIDGE}").exists()
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    assert not [line for line in rules.splitlines() if any(p in line for p in localcluster.NODE_CHAIN_PREFIXES)]
    sets = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, check=True).stdout.split()
    assert not [name for name in sets if name.startswith(localcluster.NODE_IPSET_PREFIXES)]
    assert str(state_dir) not in Path("/proc/self/mountinfo").read_text()
    assert not [h for h in hierarchies if (h / localcluster.NODE_CGROUP_ROOT).exists()]
    assert not localcluster.pids_mentioning(str(state_dir))
    assert not localcluster.NODE_OWNER_FILE.exists()


def test_a_refused_cgroup_setup_is_named_and_leaves_the_host_clean(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before the module's cluster starts (the node is one per machine). A "hierarchy" that is a regular
    # file: making the kubelet's cgroup under it fails as a refused mkdir would.
    owner = localcluster.node_owner()  # never a skip: the module's own cluster would refuse such a node too
    assert owner is None, f"the real node is in use by {owner}: stop that cluster first (one per machine)"
    real_hierarchies = localcluster.cgroup_hierarchies()
    sysctls = {key: localcluster.read_sysctl(key) for key in localcluster.HOST_SYSCTLS}
    not_a_hierarchy = tmp_path / "not-a-hierarchy"
    not_a_hierarchy.write_text("")
    monkeypatch.setattr(localcluster, "cgroup_hierarchies", lambda: [not_a_hierarchy])
    cluster = localcluster.LocalCluster(tmp_path / "state", real_node=True)
    path = re.escape(str(not_a_hierarchy / localcluster.NODE_CGROUP_ROOT))
    expected = f"cannot set up the kubelet's cgroup {path}: .*Not a directory"
    with pytest.raises(localcluster.LocalClusterError, match=expected):
        cluster.start()
    monkeypatch.undo()
    host_is_clean(cluster.state_dir, real_hierarchies)
    assert not cluster.node_marker.exists() and not cluster.status()
    assert {key: localcluster.read_sysctl(key) for key in localcluster.HOST_SYSCTLS} == sysctls


def test_a_pod_runs_to_completion_and_reaches_a_service_by_its_dns_name(
    core: kubernetes.client.CoreV1Api, namespace: str, wait_for: WaitFor
) -> None:
    node = core.read_node(localcluster.NODE_NAME)
    assert node.status.node_info.container_runtime_version.startswith("containerd://2.")
    start_running(core, namespace, wait_for, "server", {"app": "server"})
    service = core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "server"},
            "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": PORT}]},
        },
    )
    fqdn = f"server.{namespace}.svc.{localcluster.CLUSTER_DOMAIN}"

    phase, log = run_to_end(core, namespace, wait_for, "lookup", ["lookup", fqdn])
    assert (phase, log.strip()) == ("Succeeded", service.spec.cluster_ip)
    # The Service's short name (the pod's DNS search path), its ClusterIP, kube-proxy, and the server pod.
    phase, log = run_to_end(core, namespace, wait_for, "client", ["connect", "server", "80"])
    assert (phase, log.strip()) == ("Succeeded", "ok from server")
    pod_status = core.read_namespaced_pod("client", namespace).status
    assert pod_status.container_statuses[0].state.terminated.exit_code == 0


def test_cluster_dns_is_a_coredns_pod_behind_kube_dns(
    node_cluster: localcluster.LocalCluster, core: kubernetes.client.CoreV1Api
) -> None:
    (dns,) = core.list_namespaced_pod("kube-system", label_selector="k8s-app=kube-dns").items
    assert (dns.spec.node_name, dns.spec.service_account_name) == (localcluster.NODE_NAME, "coredns")
    assert dns.spec.containers[0].image == localcluster.COREDNS_IMAGE and not dns.spec.host_network
    assert any(c.type == "Ready" and c.status == "True" for c in dns.status.conditions)
    service = core.read_namespaced_service("kube-dns", "kube-system")
    assert (service.spec.cluster_ip, service.spec.selector) == (localcluster.DNS_SERVICE_IP, {"k8s-app": "kube-dns"})
    slices = kubernetes.client.DiscoveryV1Api(core.api_client).list_namespaced_endpoint_slice(
        "kube-system", label_selector="kubernetes.io/service-name=kube-dns"
    )
    # Made by the endpointslice controller from the pod, not by hand.
    assert {a for s in slices.items for e in s.endpoints or [] for a in e.addresses} == {dns.status.pod_ip}
    assert {s.metadata.labels["endpointslice.kubernetes.io/managed-by"] for s in slices.items} == {
        "endpointslice-controller.k8s.io"
    }
    assert "coredns" not in node_cluster.status()  # no CoreDNS process of the launcher's on the host
    rbac = kubernetes.client.RbacAuthorizationV1Api(core.api_client)
    rules = rbac.read_cluster_role("localcluster:coredns").rules
    assert {verb for rule in rules for verb in rule.verbs} == {"list", "watch"}, rules


def test_a_pod_reaches_the_api_server_in_cluster(
    core: kubernetes.client.CoreV1Api, namespace: str, wait_for: WaitFor
) -> None:
    # The `kubernetes` Service, the pod's ServiceAccount token and the cluster CA: what an operator pod uses.
    phase, log = run_to_end(core, namespace, wait_for, "in-cluster", ["kube-version", "-"])
    assert (phase, log.strip()) == ("Succeeded", localcluster.kubernetes_version()), log


def test_a_network_policy_denying_ingress_stops_connections_and_an_allowing_one_lets_them_through(
    node_cluster: localcluster.LocalCluster,
    core: kubernetes.client.CoreV1Api,
    networking: kubernetes.client.NetworkingV1Api,
    namespace: str,
    wait_for: WaitFor,
) -> None:
    server = start_running(core, namespace, wait_for, "server", {"app": "server"})
    service = core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "server"},
            "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": PORT}]},
        },
    ).spec.cluster_ip
    start_running(core, namespace, wait_for, "friend", {"role": "friend"})
    start_running(core, namespace, wait_for, "stranger", {"role": "stranger"})
    for client in ("friend", "stranger"):  # before any policy: both get through
        result = connect_from(node_cluster, namespace, client, server)
        assert (result.returncode, result.stdout.strip()) == (0, "ok from server"), result.stderr
    wait_for(
        lambda: connect_from(node_cluster, namespace, "stranger", service, 80).returncode == 0,
        timeout=30,
        what="the Service's rules",
    )

    networking.create_namespaced_network_policy(
        namespace,
        {
            "metadata": {"name": "deny-ingress"},
            "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]},
        },
    )
    for client in ("friend", "stranger"):
        wait_for(
            lambda c=client: connect_from(node_cluster, namespace, c, server).returncode != 0,
            timeout=30,
            what=f"{client} denied",
        )
    # Dropped, not refused: the node drops kube-router's ICMP port-unreachable, by the pod's IP or a Service's.
    denied = connect_from(node_cluster, namespace, "friend", server)
    assert denied.returncode == 1 and f"dial tcp {server}:{PORT}: i/o timeout" in denied.stderr, denied
    denied = connect_from(node_cluster, namespace, "stranger", service, 80)
    assert denied.returncode == 1 and f"dial tcp {service}:80: i/o timeout" in denied.stderr, denied

    networking.create_namespaced_network_policy(
        namespace,
        {
            "metadata": {"name": "allow-friend"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "server"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {"from": [{"podSelector": {"matchLabels": {"role": "friend"}}}], "ports": [{"port": PORT}]}
                ],
            },
        },
    )
    wait_for(
        lambda: connect_from(node_cluster, namespace, "friend", server).returncode == 0,
        timeout=30,
        what="friend allowed",
    )
    assert connect_from(node_cluster, namespace, "friend", server).stdout.strip() == "ok from server"
    assert connect_from(node_cluster, namespace, "stranger", server).returncode == 1  # still denied

    networking.delete_namespaced_network_policy("allow-friend", namespace)
    wait_for(
        lambda: connect_from(node_cluster, namespace, "friend", server).returncode != 0,
        timeout=30,
        what="friend denied again",
    )


def test_a_closed_port_of_a_pod_is_still_refused(
    node_cluster: localcluster.LocalCluster, core: kubernetes.client.CoreV1Api, namespace: str, wait_for: WaitFor
) -> None:
    server = start_running(core, namespace, wait_for, "server", {"app": "server"})
    start_running(core, namespace, wait_for, "client", {"role": "client"})
    # A port nobody listens on: the server pod's own TCP RST.
    closed = connect_from(node_cluster, namespace, "client", server, PORT + 1)
    assert closed.returncode == 1 and f"{server}:{PORT + 1}: connect: connection refused" in closed.stderr, closed


def test_pods_reach_nothing_outside_the_cluster(
    core: kubernetes.client.CoreV1Api, namespace: str, wait_for: WaitFor
) -> None:
    host = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True, check=True
    ).stdout
    host_ips = [
        line.split()[3].split("/")[0] for line in host.splitlines() if line.split()[1] != localcluster.NODE_BRIDGE
    ]
    assert host_ips, host
    phase, log = run_to_end(core, namespace, wait_for, "to-host", ["connect", host_ips[0], "22"])
    assert phase == "Failed" and "i/o timeout" in log, log
    phase, log = run_to_end(core, namespace, wait_for, "to-kubelet", ["connect", localcluster.NODE_IP, "10250"])
    assert phase == "Failed" and "i/o timeout" in log, log
    phase, log = run_to_end(core, namespace, wait_for, "outside-name", ["lookup", "deb.debian.org"])
    assert phase == "Failed" and "deb.debian.org" in log, log


def mangle_packets(rule: str) -> int:
    """The packet counter of the one mangle rule whose iptables-save line ends with `rule`."""
    dump = subprocess.run(["iptables-save", "-c", "-t", "mangle"], capture_output=True, text=True, check=True).stdout
    (counter,) = [line.split()[0] for line in dump.splitlines() if line.endswith(rule)]
    return int(counter.strip("[]").split(":")[0])


def test_a_service_without_endpoints_gets_no_connection_and_nothing_leaves_the_host(
    node_cluster: localcluster.LocalCluster, core: kubernetes.client.CoreV1Api, namespace: str, wait_for: WaitFor
) -> None:
    start_running(core, namespace, wait_for, "client", {"role": "client"})
    service = core.create_namespaced_service(
        namespace,
        {"metadata": {"name": "empty"}, "spec": {"selector": {"app": "nobody"}, "ports": [{"port": 80}]}},
    ).spec.cluster_ip
    wait_for(  # kube-proxy has the Service: its REJECT for a Service without endpoints
        lambda: (
            f"-A KUBE-SERVICES -d {service}/32"
            in subprocess.run(["iptables-save", "-t", "filter"], capture_output=True, text=True, check=True).stdout
        ),
        timeout=30,
        what="kube-proxy's rule for the Service",
    )
    # Counts what leaves from the pod network by the default route's interface (eth0), where the host would
    # send a ClusterIP nothing DNATs. (Not "any but the bridge": the host's own packets from 10.245.0.1 to
    # itself, the API server's to the kubelet, leave by lo.)
    route = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True, text=True, check=True)
    fields = route.stdout.split()
    assert "dev" in fields, route.stdout
    comment = f"{localcluster.NODE_FORWARD_CHAIN}-test-{namespace}"
    leaving = ["POSTROUTING", "-s", localcluster.POD_CIDR, "-o", fields[fields.index("dev") + 1]]
    leaving += ["-m", "comment", "--comment", comment]
    subprocess.run(["iptables", "-w", "-t", "mangle", "-I", *leaving], check=True)
    try:
        dropped = mangle_packets(f"-A {localcluster.NODE_FORWARD_CHAIN} -j DROP")
        refused = connect_from(node_cluster, namespace, "client", service, 80)
        assert refused.returncode == 1 and f"dial tcp {service}:80: i/o timeout" in refused.stderr, refused
        assert mangle_packets(f"--comment {comment}") == 0  # nothing left by eth0
        assert mangle_packets(f"-A {localcluster.NODE_FORWARD_CHAIN} -j DROP") > dropped  # the SYNs, dropped
    finally:
        subprocess.run(["iptables", "-w", "-t", "mangle", "-D", *leaving], check=True)


def test_a_pod_whose_image_is_not_on_the_node_says_which_image(
    core: kubernetes.client.CoreV1Api, namespace: str, wait_for: WaitFor
) -> None:
    missing = "localcluster.local/not-imported:1"
    core.create_namespaced_pod(namespace, pod("missing", ["serve", "1"], image=missing))

    def waiting() -> Any:
        statuses = core.read_namespaced_pod("missing", namespace).status.container_statuses or []
        state = statuses[0].state.waiting if statuses else None
        return state if state and state.reason in ("ErrImagePull", "ImagePullBackOff") and state.message else None

    state = wait_for(waiting, timeout=60, what="the pod's image pull to fail")
    assert missing in state.message, state


def test_an_imported_image_tarball_runs(
    node_cluster: localcluster.LocalCluster,
    core: kubernetes.client.CoreV1Api,
    namespace: str,
    wait_for: WaitFor,
    tmp_path: Path,
) -> None:
    name = f"localcluster.local/imported-{uuid.uuid4().hex[:6]}:1"
    tarball = tmp_path / "image.tar"
    localcluster.image_tar(tarball, name, localcluster.node_bin_dir() / "nettool", ["/nettool"], "65532:65532")
    node_cluster.import_image(tarball)
    core.create_namespaced_pod(namespace, pod("imported", ["lookup", "kubernetes.default"], image=name))
    phase = wait_for(
        lambda: (p := core.read_namespaced_pod("imported", namespace).status.phase) in ("Succeeded", "Failed") and p,
        timeout=60,
        what="the imported image's pod to finish",
    )
    assert phase == "Succeeded", pod_log(core, namespace, "imported")
    with pytest.raises(localcluster.LocalClusterError, match="does not exist"):
        node_cluster.import_image(tmp_path / "absent.tar")


def test_stop_leaves_the_host_as_it_was(
    node_cluster: localcluster.LocalCluster, core: kubernetes.client.CoreV1Api, wait_for: WaitFor
) -> None:
    start_running(core, "default", wait_for, "left-running", {"app": "left"})  # stop() must kill it
    node_cluster.stop()
    host_is_clean(node_cluster.state_dir, localcluster.cgroup_hierarchies())

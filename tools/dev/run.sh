#!/usr/bin/env bash
# `make run`. Without $KUBECONFIG: the local cluster with its real node (built and started if needed), the
# project's images imported into it, the CRDs, the demo platform (deploy/dev/platform/: PostgreSQL, Redis, api
# and backend in hungryhippaahneties, an S3 API server in storage), the samples' prerequisites, the sample
# RunbookGrant, and the operator installed as users install it (`kubectl apply -k deploy/`, one replica), its
# log followed in the foreground. The operator runs as a pod because the samples name the platform by its
# Service DNS names (postgresql.hungryhippaahneties.svc, s3.storage.svc), which only cluster DNS resolves, and
# because the backup pods run the same image. Ctrl-C stops the cluster and everything in it.
# With $KUBECONFIG set: against that cluster, the CRDs, the prerequisites with placeholder workloads
# (deploy/dev/workloads.yaml) and the operator on this host, in the foreground.
# RUNBOOK_RUN_STATE_DIR moves the local cluster's state directory (default .cache/localcluster/).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
NS=hungryhippaahneties
started=$(date +%s)
elapsed() { echo "$(( $(date +%s) - started )) s"; }

if [ -z "${KUBECONFIG:-}" ]; then
  CLUSTER="$PY tools/localcluster/localcluster.py --real-node"
  [ -n "${RUNBOOK_RUN_STATE_DIR:-}" ] && CLUSTER="$CLUSTER --state-dir $RUNBOOK_RUN_STATE_DIR"
  PATH="$($CLUSTER build | sed -n 1p):$PATH"  # the kubectl built with the control plane
  export PATH
  # Every image the local cluster runs (the operator's, the platform's), built and cached by tools/image/.
  tars=$(nice $PY tools/image/image.py tars)
  echo "run: images built ($(elapsed))"
  KUBECONFIG=$($CLUSTER start)
  export KUBECONFIG
  trap '$CLUSTER stop' EXIT
  for tar in $($PY -c 'import json, sys; print(" ".join(json.load(sys.stdin).values()))' <<<"$tars"); do
    $CLUSTER import-image "$tar"
  done
  echo "run: local cluster with its real node up ($(elapsed)); kubectl with: export KUBECONFIG=$KUBECONFIG"
else
  echo "run: using KUBECONFIG=$KUBECONFIG"
fi

kubectl apply --server-side -k crds/ >/dev/null
kubectl wait --for=condition=Established crd -l app.kubernetes.io/part-of=runbook-operator --timeout=60s >/dev/null
# Established is not yet servable: a new CRD's storage answers 429 ("storage is (re)initializing") for a
# moment, which the operator's first LISTs would log as errors. Wait until every kind can be listed.
plurals=$(kubectl get crd -l app.kubernetes.io/part-of=runbook-operator -o jsonpath='{.items[*].metadata.name}')
for plural in $plurals; do
  for attempt in $(seq 1 60); do
    kubectl get "$plural" --all-namespaces --request-timeout=5s >/dev/null 2>&1 && break
    [ "$attempt" -eq 60 ] && { echo "run: $plural cannot be listed after 30 s" >&2; exit 1; }
    sleep 0.5
  done
done
if [ -z "${CLUSTER:-}" ]; then
  tools/dev/prerequisites.sh "$NS"
  kubectl apply -n "$NS" -f deploy/dev/workloads.yaml >/dev/null
else
  # The platform first: its Secrets (fixed development passwords) are the ones its servers start with, and the
  # prerequisites add only what it lacks (the key pair, the Redis TLS certificates, the passphrase).
  kubectl apply -k deploy/dev/platform/ >/dev/null
  tools/dev/prerequisites.sh "$NS"
fi
# What the samples of hungryhippaahneties may reach beyond the namespace (a cluster administrator's grant).
kubectl apply --server-side -f deploy/samples/admin/runbookgrant.yaml >/dev/null
[ -z "${CLUSTER:-}" ] && exec .venv/bin/runbook-operator run --log-format "${LOG_FORMAT:-full}"

kubectl apply --server-side -k deploy/ >/dev/null
# One replica is enough here (the base's second is a hot standby); the machine's cores go to the platform.
kubectl scale -n runbook-system deployment/runbook-operator --replicas=1 >/dev/null
for workload in statefulset/postgresql statefulset/redis deployment/api deployment/backend; do
  kubectl rollout status -n "$NS" "$workload" --timeout=300s >/dev/null
done
kubectl rollout status -n storage deployment/s3 --timeout=300s >/dev/null  # the buckets: its postStart hook
kubectl wait -n "$NS" --for=condition=Complete job --all --timeout=300s >/dev/null  # the platform's setup Jobs
kubectl rollout status -n runbook-system deployment/runbook-operator --timeout=300s >/dev/null
echo "run: platform and operator ready ($(elapsed)); next, in another shell: kubectl apply -f deploy/samples/"
# The operator's log in the foreground, again after a restart of its pod.
while true; do
  kubectl logs -f -n runbook-system deployment/runbook-operator --pod-running-timeout=60s || true
  sleep 2
done

#!/usr/bin/env bash
# `make run`: the operator in the foreground. With $KUBECONFIG set, against that cluster; otherwise the
# local control plane is built if needed, started, given the CRDs and the hungryhippaahneties namespace
# with the samples' prerequisites. Ctrl-C stops the operator and the local cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
CLUSTER="$PY tools/localcluster/localcluster.py"

if [ -z "${KUBECONFIG:-}" ]; then
  PATH="$($CLUSTER build):$PATH"  # the kubectl built with the control plane
  export PATH
  $CLUSTER start
  KUBECONFIG=$($CLUSTER kubeconfig)
  export KUBECONFIG
  trap '$CLUSTER stop' EXIT
  echo "run: local control plane up; kubectl with: export KUBECONFIG=$KUBECONFIG"
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
tools/dev/prerequisites.sh hungryhippaahneties
# What the samples of hungryhippaahneties may reach beyond the namespace (a cluster administrator's grant).
kubectl apply --server-side -f deploy/samples/admin/runbookgrant.yaml >/dev/null

.venv/bin/runbook-operator run --log-format "${LOG_FORMAT:-full}"

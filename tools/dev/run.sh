#!/usr/bin/env bash
# `make run`: the operator in the foreground. With $KUBECONFIG set, against that cluster; otherwise the
# local control plane is built if needed, started, given the CRDs and the hungryhippaahneties namespace
# with the samples' prerequisites. Ctrl-C stops the operator and the local cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
CLUSTER="$PY tools/localcluster/localcluster.py"

if [ -z "${KUBECONFIG:-}" ]; then
  $CLUSTER build
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
tools/dev/prerequisites.sh hungryhippaahneties

.venv/bin/runbook-operator run --log-format "${LOG_FORMAT:-full}"

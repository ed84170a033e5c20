#!/usr/bin/env bash
# The samples' prerequisites in a namespace, for a development cluster: the runbook's workloads and the
# Secrets and ConfigMap the samples name. Secret values are random and never printed; existing objects
# are left alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
ns=${1:-hungryhippaahneties}
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply -n "$ns" -f deploy/dev/workloads.yaml >/dev/null

random() { head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32; }
secret() {  # secret NAME KEY=VALUE...
  local name=$1; shift
  kubectl get secret -n "$ns" "$name" >/dev/null 2>&1 && return 0
  local args=()
  for kv in "$@"; do args+=(--from-literal="$kv"); done
  kubectl create secret generic -n "$ns" "$name" "${args[@]}" >/dev/null
}
secret db-credentials POSTGRES_USER=hipaa_app_user "POSTGRES_PASSWORD=$(random)"
secret postgres-admin POSTGRES_USER=postgres "POSTGRES_PASSWORD=$(random)"
secret redis-credentials "REDIS_PASSWORD=$(random)"
secret backup-s3-credentials AWS_ACCESS_KEY_ID=dev "AWS_SECRET_ACCESS_KEY=$(random)"
secret backup-gpg-passphrase "passphrase=$(random)"
if ! kubectl get configmap -n "$ns" backup-gpg-recipients >/dev/null 2>&1; then
  home=$(mktemp -d); trap 'rm -rf "$home"' EXIT
  gpg --homedir "$home" --batch --quiet --passphrase '' --quick-generate-key \
    "Security Team (development) <security@example.com>" rsa3072 encrypt never 2>/dev/null
  gpg --homedir "$home" --armor --export security@example.com > "$home/security-team.asc"
  kubectl create configmap -n "$ns" backup-gpg-recipients --from-file="$home/security-team.asc" >/dev/null
fi
echo "prerequisites: namespace $ns ready"

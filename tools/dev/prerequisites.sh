#!/usr/bin/env bash
# The samples' prerequisites in a namespace, for a development cluster: the namespace and the Secrets and
# ConfigMap the samples (and the demo platform, deploy/dev/platform/) name. Secret values are random and never
# printed; existing objects are left alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
ns=${1:-hungryhippaahneties}
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null

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
# The security team's key pair: the public key for the backup and evidence policies, the private key for
# the BackupRestore sample (a development cluster only: in production the private key stays offline).
if ! kubectl get secret -n "$ns" restore-gpg-private-key >/dev/null 2>&1; then
  if kubectl get configmap -n "$ns" backup-gpg-recipients >/dev/null 2>&1; then
    echo "prerequisites: restore-gpg-private-key is missing: replacing backup-gpg-recipients with a new key pair" \
      "(backups made with the old key cannot be restored with the new one)" >&2
  fi
  gpghome=$(mktemp -d)
  gpg --homedir "$gpghome" --batch --quiet --passphrase '' --quick-generate-key \
    "Security Team (development) <security@example.com>" rsa3072 encrypt never 2>/dev/null
  gpg --homedir "$gpghome" --armor --export security@example.com > "$gpghome/security-team.asc"
  gpg --homedir "$gpghome" --batch --armor --export-secret-keys security@example.com \
    > "$gpghome/security-team-private.asc"
  kubectl create configmap -n "$ns" backup-gpg-recipients --from-file="$gpghome/security-team.asc" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl create secret generic -n "$ns" restore-gpg-private-key \
    --from-file="$gpghome/security-team-private.asc" >/dev/null
  gpgconf --homedir "$gpghome" --kill all 2>/dev/null || true
  rm -rf "$gpghome"
fi

# Redis serves TLS on 6380 in the runbook: a development CA and a server certificate for its Service name,
# as a kubernetes.io/tls Secret with the CA beside it (ca.crt is what the Redis sample names).
if ! kubectl get secret -n "$ns" redis-tls >/dev/null 2>&1; then
  pki=$(mktemp -d)
  openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=runbook development CA" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=redis.$ns.svc" -keyout "$pki/tls.key" -out "$pki/tls.csr" 2>/dev/null
  printf 'subjectAltName=DNS:redis.%s.svc,DNS:redis.%s.svc.cluster.local,DNS:redis\n' "$ns" "$ns" > "$pki/san"
  openssl x509 -req -in "$pki/tls.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 365 \
    -extfile "$pki/san" -out "$pki/tls.crt" 2>/dev/null
  kubectl create secret generic -n "$ns" redis-tls --type=kubernetes.io/tls \
    --from-file=tls.crt="$pki/tls.crt" --from-file=tls.key="$pki/tls.key" --from-file=ca.crt="$pki/ca.crt" >/dev/null
  rm -rf "$pki"
fi
echo "prerequisites: namespace $ns ready"

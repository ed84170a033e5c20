//go:build tools

// Package tools pins the helm command that helm.py builds, so `go mod tidy` keeps it.
package tools

import _ "helm.sh/helm/v3/cmd/helm"

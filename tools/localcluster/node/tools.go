//go:build tools

// Package tools pins the node commands that localcluster.py builds for the real node, so `go mod tidy`
// keeps them.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)

//go:build tools

// Package tools pins kube-router, the NetworkPolicy enforcer (iptables and ipset) of the real node that
// localcluster.py builds, so `go mod tidy` keeps it.
package tools

import _ "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"

// Command coredns is CoreDNS with only the plugins the real node's cluster DNS uses: the kubernetes
// plugin answers cluster.local from the API server; errors, health, ready and cache serve it. It runs as
// the kube-dns pod of kube-system (localcluster.py's COREFILE). No forward plugin: pods of the local
// cluster resolve only names of this cluster.
package main

import (
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"

	"github.com/coredns/coredns/coremain"
)

func main() {
	coremain.Run()
}

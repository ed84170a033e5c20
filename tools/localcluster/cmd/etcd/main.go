// Command etcd runs the etcd server at the version kube-apiserver's client libraries select.
// etcd's own main package lives in the go.etcd.io/etcd/v3 root module, which is not part of this
// module graph, so this wraps go.etcd.io/etcd/server/v3/etcdmain instead.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}

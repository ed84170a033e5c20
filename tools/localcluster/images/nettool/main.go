// Command nettool is the real node's test image: a TCP server, a TCP client and a DNS lookup, so tests
// can show that pods run, that Service names resolve and that NetworkPolicies stop connections.
//
//	nettool serve PORT            answer every TCP connection with "ok from HOSTNAME\n"
//	nettool connect HOST PORT     connect (3 s timeout), print the answer; exit 1 if it fails
//	nettool lookup NAME           resolve NAME, print its addresses; exit 1 if it fails
//	nettool kube-version -        GET the API server's /version in-cluster (the pod's ServiceAccount token
//	                              and CA, KUBERNETES_SERVICE_HOST/PORT), print its gitVersion
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

const serviceAccount = "/var/run/secrets/kubernetes.io/serviceaccount/"

func main() {
	if len(os.Args) < 3 {
		fail("usage: nettool serve PORT | connect HOST PORT | lookup NAME | kube-version -")
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2])
	case "connect":
		if len(os.Args) != 4 {
			fail("usage: nettool connect HOST PORT")
		}
		connect(net.JoinHostPort(os.Args[2], os.Args[3]))
	case "lookup":
		lookup(os.Args[2])
	case "kube-version":
		kubeVersion()
	default:
		fail("unknown command " + os.Args[1])
	}
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "nettool:", message)
	os.Exit(1)
}

func serve(port string) {
	listener, err := net.Listen("tcp", ":"+port)
	if err != nil {
		fail(err.Error())
	}
	hostname, _ := os.Hostname()
	fmt.Println("serving on", listener.Addr())
	for {
		conn, err := listener.Accept()
		if err != nil {
			fail(err.Error())
		}
		fmt.Println("connection from", conn.RemoteAddr())
		fmt.Fprintf(conn, "ok from %s\n", hostname)
		conn.Close()
	}
}

func connect(address string) {
	conn, err := net.DialTimeout("tcp", address, 3*time.Second)
	if err != nil {
		fail(err.Error())
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	answer, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		fail("reading from " + address + ": " + err.Error())
	}
	fmt.Println(strings.TrimSpace(answer))
}

func lookup(name string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	addresses, err := net.DefaultResolver.LookupHost(ctx, name)
	if err != nil {
		fail(err.Error())
	}
	fmt.Println(strings.Join(addresses, " "))
}

func kubeVersion() {
	token, err := os.ReadFile(serviceAccount + "token")
	if err != nil {
		fail(err.Error())
	}
	ca, err := os.ReadFile(serviceAccount + "ca.crt")
	if err != nil {
		fail(err.Error())
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(ca) {
		fail("no certificate in " + serviceAccount + "ca.crt")
	}
	client := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}},
	}
	url := "https://" + net.JoinHostPort(os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")) + "/version"
	request, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		fail(err.Error())
	}
	request.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	response, err := client.Do(request)
	if err != nil {
		fail(err.Error())
	}
	defer response.Body.Close()
	var version struct {
		GitVersion string `json:"gitVersion"`
	}
	if err := json.NewDecoder(response.Body).Decode(&version); err != nil || response.StatusCode != http.StatusOK {
		fail(fmt.Sprintf("GET %s: HTTP %d %v", url, response.StatusCode, err))
	}
	fmt.Println(version.GitVersion)
}

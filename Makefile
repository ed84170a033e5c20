# The two commands of the README: `make run` and `make test`. Everything else is for development.
.PHONY: setup run test lint crds unit integration cluster-build node-build helm-build image e2e-images cluster-start cluster-stop bench clean

PY := .venv/bin/python
CLUSTER := $(PY) tools/localcluster/localcluster.py

setup:
	@tools/dev/setup.sh

## Run the operator in the foreground: against $$KUBECONFIG if set, else the local control plane.
run: setup
	@tools/dev/run.sh

## Everything CI checks: lint, types, unit and integration tests against real components.
test: setup lint cluster-build node-build helm-build e2e-images
	$(PY) -m pytest

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

crds: setup
	.venv/bin/runbook-operator crds --output crds

unit: setup
	$(PY) -m pytest tests/unit

integration: setup cluster-build node-build helm-build e2e-images
	$(PY) -m pytest tests/integration

cluster-build: setup
	$(CLUSTER) build

## The real node's binaries (kubelet, kube-proxy, containerd, CNI plugins, kube-router, CoreDNS, images), cached.
node-build: cluster-build
	$(CLUSTER) build --real-node

## helm for the chart tests (tests/integration/test_helm.py), built from its Go module and cached.
helm-build: setup
	$(PY) tools/helm/helm.py build

## The operator/agent image from the Dockerfile (Docker; the base built from Debian's packages when no registry
## is reachable), cached and exported with `docker save`: tools/image/image.py.
image: setup
	$(PY) tools/image/image.py build

## The operator's image and the e2e tier's PostgreSQL, Redis and S3 images, saved as tars for the real node.
e2e-images: setup
	$(PY) tools/image/image.py tars >/dev/null

cluster-start: cluster-build
	$(CLUSTER) start

cluster-stop:
	$(CLUSTER) stop

bench: setup cluster-build
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean: cluster-stop
	rm -rf .cache .venv .mypy_cache .ruff_cache .pytest_cache

// Builds the static binaries of the real node's local images (see localcluster.py image_tar): no
// registry is reachable, so the sandbox ("pause") image and the test image are made here.
module runbook.dev/tools/localcluster/images

go 1.26.0

"""One module per kind: the decisions. They call builders for manifests and clients for I/O."""

"""Runbook Operator: the operations runbook as Kubernetes custom resources."""

"""Kubernetes sidecar injection: `tasklane inject` for manifests (workloads.py) and the
mutating admission webhook for pods (webhook.py), both built on pod.py."""

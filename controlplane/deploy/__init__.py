"""Running tasklane outside one machine: Kubernetes manifests (`tasklane k8s manifests`,
manifests.py) and the sidecars of docker-compose.yml (compose.py).

Builders here are pure: they take options and key material and return plain objects or text;
generating keys, reading files and printing happen at the edges (controlplane/cli/k8s.py,
compose.main).
"""

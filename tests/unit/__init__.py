"""Pure, fast tests: no etcd, no Envoy, no network."""

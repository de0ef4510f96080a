"""Test and benchmark doubles, not part of the product (the wheel does not ship them): an ADS
client that plays Envoy sidecars, the real ADS server on a free port, and Envoy resources
that real Envoy accepts. tests/ and bench/ both use them; bench/ puts the repository root on
sys.path to import this package.
"""

"""Python code generated from the project's .proto files (proto/), committed.

Regenerate with `make proto` after editing a .proto (proto/README.md);
tests/unit/test_proto_gen.py fails while the committed code and the sources disagree.
"""

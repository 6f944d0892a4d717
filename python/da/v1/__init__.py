"""da.v1: messages and stubs generated from proto/da/v1/attention.proto when the package is built
(setup.py)."""

"""da.v1: the messages of proto/da/v1/attention.proto (attention_pb2, made at import from the
descriptor set that the package's build writes, setup.py); the service's stub is da/_stub.py."""

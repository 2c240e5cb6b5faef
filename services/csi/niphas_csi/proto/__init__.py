"""The CSI v1 protobuf messages and gRPC stubs (generated from csi.proto; see generate.py)."""

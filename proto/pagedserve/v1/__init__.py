"""The v1 contract: messages (`*_pb2`), gRPC stubs and servicers (`*_pb2_grpc`), generated from
the .proto files in this folder by `python proto/generate.py`. Do not edit the generated files."""

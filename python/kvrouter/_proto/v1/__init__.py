"""Generated protobuf / gRPC code; regenerate with scripts/gen_proto.py."""

"""Helpers of the endpoint-picker tests: a gRPC client that plays Envoy's ext_proc filter,
the messages Envoy sends, and the router's reservations (sources: tests/test_ext_proc.py)."""

from __future__ import annotations

import json
import queue
import random
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from kvrouter.client import RouterClient

BS = 16
ENDPOINTS = {"w1": "10.0.0.1:8000", "w2": "10.0.0.2:8000", "w3": "10.0.0.3:8000"}
PM = processing_mode_pb2.ProcessingMode


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(n)]


class Envoy:
    """One ext_proc stream, as Envoy's filter holds it: send a message, read the answers."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.outbox: queue.Queue[pb.ProcessingRequest | None] = queue.Queue()
        self.call = pb_grpc.ExternalProcessorStub(self.channel).Process(
            iter(self.outbox.get, None), timeout=30)
        self.replies = iter(self.call)

    def send(self, msg: pb.ProcessingRequest) -> None:
        self.outbox.put(msg)

    def recv(self) -> pb.ProcessingResponse:
        return next(self.replies)

    def rest(self) -> list[pb.ProcessingResponse]:
        """Half-close (Envoy is done with the request) and collect what is left."""
        self.outbox.put(None)
        return list(self.replies)

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def request_headers(path: str = "/v1/completions", extra: dict[str, str] | None = None,
                    end_of_stream: bool = False, mode: int | None = PM.FULL_DUPLEX_STREAMED,
                    subset: list[str] | None = None) -> pb.ProcessingRequest:
    hdrs = {":method": "POST" if not end_of_stream else "GET", ":path": path,
            ":authority": "gateway.example", ":scheme": "http",
            "content-type": "application/json", **(extra or {})}
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                            for k, v in hdrs.items()]),
        end_of_stream=end_of_stream))
    if mode is not None:  # Envoy >= 1.34 says its body modes in the first message
        msg.protocol_config.request_body_mode = mode
        msg.protocol_config.response_body_mode = mode
    if subset is not None:
        hint = struct_pb2.Struct()
        hint.fields["x-gateway-destination-endpoint-subset"].list_value.extend(subset)
        msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    return msg


def body_chunks(body: bytes, size: int, last_eos: bool = True) -> list[pb.ProcessingRequest]:
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    return [pb.ProcessingRequest(request_body=pb.HttpBody(
        body=p, end_of_stream=last_eos and i == len(parts) - 1)) for i, p in enumerate(parts)]


def response_headers(served: str | None = None, eos: bool = False) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest(response_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=":status", raw_value=b"200"),
            base_pb2.HeaderValue(key="content-type", raw_value=b"text/event-stream")]),
        end_of_stream=eos))
    if served is not None:
        lb = struct_pb2.Struct()
        lb.fields["x-gateway-destination-endpoint-served"].string_value = served
        msg.metadata_context.filter_metadata["envoy.lb"].CopyFrom(lb)
    return msg


def header_value(resp: pb.CommonResponse, key: str) -> str | None:
    for h in resp.header_mutation.set_headers:
        if h.header.key == key:
            return h.header.raw_value.decode()
    return None


def lb_metadata(resp: pb.ProcessingResponse) -> str:
    return resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields[
        "x-gateway-destination-endpoint"].string_value


def reserved(client: RouterClient) -> dict[str, tuple[int, int]]:
    return {w.name: (w.reserved_requests, w.reserved_prefill_tokens)
            for w in client.list_workers("default")}


def idle(client: RouterClient) -> bool:
    return all(r == (0, 0) for r in reserved(client).values())


def completion(prompt: list[int], **kw: Any) -> bytes:
    return json.dumps({"model": "default", "prompt": prompt, "max_tokens": 8,
                       "stream": True, **kw}).encode()

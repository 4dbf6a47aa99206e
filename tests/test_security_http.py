"""TLS and tokens on the HTTP front (kvrouter serve --http) with the gRPC ports' files and
principals: a real router, https with a CA made at test time."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import httpx
import pytest

from kvrouter.testing.processes import RouterProcess, free_port, start_router
from tests.security_helpers import Pki, new_token, write_auth_file

TOKENS = {"client": new_token(), "worker": new_token()}


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RouterProcess, str, Pki]]:
    work = tmp_path_factory.mktemp("http-sec")
    pki = Pki.create(work / "pki")
    cert, key = pki.issue("router", server=True)
    auth = write_auth_file(work / "auth.yaml", [
        {"name": "client", "roles": ["client"], "token": TOKENS["client"]},
        {"name": "w0", "roles": ["worker"], "token": TOKENS["worker"]}])
    port = free_port()
    rp = start_router(work, {"router": {"tls_cert": str(cert), "tls_key": str(key),
                                        "auth_file": str(auth), "http": f"127.0.0.1:{port}"}},
                      security=pki.client())
    yield rp, f"https://127.0.0.1:{port}", pki
    rp.stop()


def _client(pki: Pki, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca)), headers=headers,
                        timeout=10)


def test_http_front_needs_a_client_token(front: tuple[RouterProcess, str, Pki]) -> None:
    _, url, pki = front
    with _client(pki, TOKENS["client"]) as c:
        r = c.get(f"{url}/v1/models")
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "default"
    with _client(pki) as c:
        r = c.get(f"{url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get(f"{url}/health").status_code == 200  # probes stay open
    with _client(pki, new_token()) as c:
        assert c.get(f"{url}/v1/models").status_code == 401
    with _client(pki, TOKENS["worker"]) as c:
        r = c.post(f"{url}/v1/completions", json={"model": "default", "prompt": [1, 2, 3]})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


def test_http_front_serves_tls_only(front: tuple[RouterProcess, str, Pki]) -> None:
    _, url, _ = front
    with httpx.Client(timeout=5) as c, pytest.raises(httpx.HTTPError):
        c.get(url.replace("https://", "http://") + "/health")

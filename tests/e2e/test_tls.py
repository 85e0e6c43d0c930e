"""TLS and mutual TLS on the public gRPC port, through the real launcher with a CA made in the test.

The launcher must still see the router become ready (it waits on the
plaintext HTTP /health when gRPC is TLS), and clients are served or refused
by the handshake: with TLS, a client that trusts the CA is served and a
plaintext one is not; with mutual TLS, only a client holding a certificate
from the configured CA is served.
"""

from __future__ import annotations

import http.client
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from text_generation_server.pb.fmaas import generation_pb2, generation_pb2_grpc
from tls_certs import Pki, make_pki

from .conftest import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class TlsServer(ServerProcess):
    """A launcher serving gRPC over TLS; its own health checks present the test client's certificate."""

    def __init__(self, tmp: Path, model: Path, pki: Pki, *, mutual: bool):
        args = ["--model-id", str(model), "--max-total-tokens", "64"]
        env = {"TLS_CERT_PATH": str(pki.server_cert), "TLS_KEY_PATH": str(pki.server_key)}
        if mutual:
            args += ["--tls-client-ca-cert-path", str(pki.ca)]
        super().__init__(tmp, args, env)
        self.pki = pki

    def channel(self, cert: Path | None = None, key: Path | None = None) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.pki.ca.read_bytes(),
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )
        return grpc.secure_channel(self.address, credentials)

    def health(self, service: str = "") -> int | None:
        try:
            with self.channel(self.pki.client_cert, self.pki.client_key) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
        except grpc.RpcError:
            return None


def generate(channel: grpc.Channel) -> str:
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    reply = stub.Generate(
        generation_pb2.BatchedGenerationRequest(
            requests=[generation_pb2.GenerationRequest(text="The capital of France is")],
            params=generation_pb2.Parameters(
                method=generation_pb2.GREEDY, stopping=generation_pb2.StoppingCriteria(max_new_tokens=4)
            ),
        ),
        timeout=60,
    )
    assert reply.responses[0].generated_token_count == 4
    return reply.responses[0].text


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        generate(channel)
    return err.value.code()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _serve(tiny_llama, tmp_path_factory, pki, mutual):
    server = TlsServer(tmp_path_factory.mktemp("tls-server"), tiny_llama, pki, mutual=mutual).start()
    yield server
    assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="module")
def tls_server(tiny_llama, tmp_path_factory, pki):
    yield from _serve(tiny_llama, tmp_path_factory, pki, mutual=False)


@pytest.fixture(scope="module")
def mtls_server(tiny_llama, tmp_path_factory, pki):
    yield from _serve(tiny_llama, tmp_path_factory, pki, mutual=True)


def test_tls_client_trusting_the_ca_is_served(tls_server):
    with tls_server.channel() as channel:
        assert isinstance(generate(channel), str)
    assert "Ready: fmaas.GenerationService" in tls_server.log_path.read_text()
    assert "(TLS)" in tls_server.log_path.read_text()


def test_plaintext_client_is_refused_when_tls_is_on(tls_server):
    with grpc.insecure_channel(tls_server.address) as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_http_health_stays_plaintext_and_reports_serving(tls_server):
    connection = http.client.HTTPConnection("127.0.0.1", tls_server.http_port, timeout=10)
    try:
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
    finally:
        connection.close()


def test_mtls_client_with_a_certificate_from_the_ca_is_served(mtls_server):
    with mtls_server.channel(mtls_server.pki.client_cert, mtls_server.pki.client_key) as channel:
        assert isinstance(generate(channel), str)
    assert "(mutual TLS)" in mtls_server.log_path.read_text()


def test_mtls_client_without_a_certificate_is_refused(mtls_server):
    with mtls_server.channel() as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_with_a_certificate_from_another_ca_is_refused(mtls_server):
    with mtls_server.channel(mtls_server.pki.stranger_cert, mtls_server.pki.stranger_key) as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_mtls_health_needs_a_client_certificate_too(mtls_server):
    assert mtls_server.health() == health_pb2.HealthCheckResponse.SERVING
    with mtls_server.channel() as channel:
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


def _channel(address: str, ca: Path, cert: Path, key: Path) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
    )
    # A connection of its own: a shared subchannel could reuse one made before the rotation.
    return grpc.secure_channel(address, credentials, options=[("grpc.use_local_subchannel_pool", 1)])


def _replace(source: Path, target: Path) -> None:
    """Write ``target`` the way secret updaters do: a new file renamed over the old one."""
    partial = target.with_suffix(".new")
    partial.write_bytes(source.read_bytes())
    partial.replace(target)


def test_certificates_rotated_on_disk_are_served_to_new_connections_without_a_restart(tiny_llama, tmp_path_factory):
    """mTLS with the server certificate, its key and the client CA in one directory. Rotating them to
    a new CA (as cert-manager renews a secret) is picked up at the next connection: clients of the new
    CA are served, clients of the old one refused. A rotation caught half-way (the new certificate
    beside the old key) keeps the old certificate in service and says so in the log."""
    old = make_pki(tmp_path_factory.mktemp("pki-old"))
    new = make_pki(tmp_path_factory.mktemp("pki-new"))
    live_dir = tmp_path_factory.mktemp("pki-live")
    live = Pki(
        ca=live_dir / "ca.pem", server_cert=live_dir / "tls.crt", server_key=live_dir / "tls.key",
        client_cert=old.client_cert, client_key=old.client_key,
        stranger_cert=old.stranger_cert, stranger_key=old.stranger_key,
    )
    for source, target in ((old.ca, live.ca), (old.server_cert, live.server_cert), (old.server_key, live.server_key)):
        _replace(source, target)
    server = TlsServer(tmp_path_factory.mktemp("tls-rotate"), tiny_llama, live, mutual=True).start()
    try:
        address = server.address
        with _channel(address, old.ca, old.client_cert, old.client_key) as kept:
            assert isinstance(generate(kept), str)

            # Half-way: the new certificate beside the old key. Still the old certificate.
            _replace(new.server_cert, live.server_cert)
            with _channel(address, old.ca, old.client_cert, old.client_key) as channel:
                assert isinstance(generate(channel), str)
            assert "cannot be used" in server.log_path.read_text()

            _replace(new.server_key, live.server_key)
            _replace(new.ca, live.ca)
            with _channel(address, new.ca, new.client_cert, new.client_key) as channel:
                assert isinstance(generate(channel), str)
            with _channel(address, old.ca, old.client_cert, old.client_key) as channel:
                assert refused(channel) == grpc.StatusCode.UNAVAILABLE  # the old CA no longer verifies us
            with _channel(address, new.ca, old.client_cert, old.client_key) as channel:
                assert refused(channel) == grpc.StatusCode.UNAVAILABLE  # nor does the new client CA trust old clients
            # A connection made before the rotation keeps working.
            assert isinstance(generate(kept), str)
        assert "TLS certificate reloaded" in server.log_path.read_text()
    finally:
        assert server.stop() == 0, server.log_tail()

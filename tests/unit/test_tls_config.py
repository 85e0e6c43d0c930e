"""TLS flags: environment variables, what reaches the router, and bad files refused before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from text_generation_launcher.args import ArgsError, parse_args, router_tls_args
from text_generation_router.config import ConfigError
from text_generation_router.config import parse_args as parse_router_args
from tls_certs import Pki, make_pki

LAUNCHER = Path(sys.executable).parent / "text-generation-launcher"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def parse(argv: list[str], env: dict[str, str] | None = None):
    return parse_args(argv, env=env or {}, cuda_device_count=lambda: 0)


def refused(argv: list[str], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ArgsError) as err:
        parse(argv, env)
    return str(err.value)


def test_tls_is_off_by_default():
    args = parse([])
    assert (args.tls_cert_path, args.tls_key_path, args.tls_client_ca_cert_path) == (None, None, None)
    assert router_tls_args(args) == []
    assert parse_router_args([], env={}).tls is None


def test_tls_flags_read_their_environment_variables_and_reach_the_router(pki):
    env = {"TLS_CERT_PATH": str(pki.server_cert), "TLS_KEY_PATH": str(pki.server_key),
           "TLS_CLIENT_CA_CERT_PATH": str(pki.ca)}
    args = parse([], env)
    assert router_tls_args(args) == [
        "--tls-cert-path", str(pki.server_cert), "--tls-key-path", str(pki.server_key),
        "--tls-client-ca-cert-path", str(pki.ca),
    ]
    tls = parse_router_args(router_tls_args(args), env={}).tls
    assert tls is not None and tls.mutual and tls.client_ca_path == str(pki.ca)
    assert parse_router_args([], env=env).tls == tls


def test_server_tls_without_client_ca_is_not_mutual(pki):
    tls = parse_router_args(["--tls-cert-path", str(pki.server_cert), "--tls-key-path", str(pki.server_key)], env={}).tls
    assert tls is not None and not tls.mutual


@pytest.mark.parametrize(
    "given, message",
    [
        (("cert",), "--tls-cert-path needs --tls-key-path"),
        (("key",), "--tls-key-path needs --tls-cert-path"),
        (("ca",), "--tls-client-ca-cert-path needs --tls-cert-path and --tls-key-path"),
        (("key", "ca"), "--tls-key-path needs --tls-cert-path"),
    ],
)
def test_incomplete_tls_flags_are_refused(pki, given, message):
    files = {"cert": ("--tls-cert-path", pki.server_cert), "key": ("--tls-key-path", pki.server_key),
             "ca": ("--tls-client-ca-cert-path", pki.ca)}
    argv = [str(item) for name in given for item in files[name]]
    assert message in refused(argv)
    with pytest.raises(ConfigError, match=message):
        parse_router_args(argv, env={})


def test_a_missing_file_is_refused_by_the_flag_parser(pki, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["--tls-cert-path", str(tmp_path / "nope.pem"), "--tls-key-path", str(pki.server_key)])
    assert exc.value.code == 2
    assert f"argument --tls-cert-path: {tmp_path / 'nope.pem'}: no such file" in capsys.readouterr().err


def test_a_missing_file_from_the_environment_names_the_variable(pki, tmp_path):
    message = refused([], {"TLS_KEY_PATH": str(tmp_path / "gone.key")})
    assert message == f"environment variable TLS_KEY_PATH={str(tmp_path / 'gone.key')!r}: {tmp_path / 'gone.key'}: no such file"


def test_files_of_the_wrong_kind_are_refused(pki):
    assert "not a PEM certificate" in refused(["--tls-cert-path", str(pki.server_key), "--tls-key-path", str(pki.server_key)])
    assert "not a PEM private key" in refused(["--tls-cert-path", str(pki.server_cert), "--tls-key-path", str(pki.server_cert)])
    assert f"--tls-client-ca-cert-path {pki.server_key}: not a PEM certificate" in refused(
        ["--tls-cert-path", str(pki.server_cert), "--tls-key-path", str(pki.server_key),
         "--tls-client-ca-cert-path", str(pki.server_key)]
    )


def test_a_key_of_another_certificate_is_refused(pki):
    message = refused(["--tls-cert-path", str(pki.server_cert), "--tls-key-path", str(pki.client_key)])
    assert message == f"--tls-key-path {pki.client_key} is not the private key of --tls-cert-path {pki.server_cert}"


def test_a_corrupt_certificate_is_refused(pki, tmp_path):
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    assert f"--tls-cert-path {corrupt} / --tls-key-path {pki.server_key}: cannot be loaded" in refused(
        ["--tls-cert-path", str(corrupt), "--tls-key-path", str(pki.server_key)]
    )


def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(pki, tmp_path):
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:secret", "-out", str(encrypted)],
        check=True, capture_output=True, timeout=60,
    )
    message = refused(["--tls-cert-path", str(pki.server_cert), "--tls-key-path", str(encrypted)])
    assert "the key is encrypted" in message


def test_the_launcher_refuses_bad_tls_before_starting_anything(pki, tmp_path):
    """Exit 2 with one line naming the flag; no shard (which would need a model) was started."""
    done = subprocess.run(
        [str(LAUNCHER), "--model-id", str(tmp_path / "no-model"), "--tls-key-path", str(pki.server_key)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, done.stderr
    assert "--tls-key-path needs --tls-cert-path" in done.stderr
    assert "Starting shard" not in done.stderr and "no-model" not in done.stderr

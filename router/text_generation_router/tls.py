"""TLS on the public gRPC port: which files, checked before anything listens.

``--tls-cert-path`` and ``--tls-key-path`` turn TLS on (both or neither);
``--tls-client-ca-cert-path`` adds mutual TLS: only clients presenting a
certificate signed by that CA complete the handshake. The files are loaded
once with the standard library's TLS stack at flag-check time, so a missing
file, a file that is not PEM, an encrypted key or a key that does not belong
to the certificate is refused with a message naming the flag, before any
shard starts, rather than surfacing as failed handshakes later.

Certificates rotated on disk (cert-manager renewing a Kubernetes secret, a
cron job replacing files) are picked up without a restart: before each new
connection's handshake gRPC asks ``ReloadingCredentials`` for the current
files, which re-reads them when their modification time, size or inode
changed. Files caught half-written (a key that does not match the
certificate yet) are not used: the previous certificate keeps being served
and the change is tried again at the next handshake. Connections already
open keep the certificate they were made with.
"""

from __future__ import annotations

import os
import ssl
import threading
from dataclasses import dataclass

from loguru import logger


class TlsConfigError(ValueError):
    """TLS flags that cannot work; the message names the flag and the file."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for the public gRPC port; ``client_ca_path`` set means client certificates are required."""

    cert_path: str
    key_path: str
    client_ca_path: str | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca_path is not None


def tls_files(cert_path: str | None, key_path: str | None, client_ca_path: str | None) -> TlsFiles | None:
    """The checked TLS settings, or None when TLS is off. Raises TlsConfigError."""
    if cert_path is None and key_path is None:
        if client_ca_path is not None:
            raise TlsConfigError(
                "--tls-client-ca-cert-path needs --tls-cert-path and --tls-key-path: "
                "mutual TLS is TLS with client certificates, so the server needs its own certificate and key"
            )
        return None
    if key_path is None:
        raise TlsConfigError("--tls-cert-path needs --tls-key-path (the certificate's private key)")
    if cert_path is None:
        raise TlsConfigError("--tls-key-path needs --tls-cert-path (the certificate the key belongs to)")
    files = TlsFiles(cert_path, key_path, client_ca_path)
    _check_loadable(files)
    return files


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TlsConfigError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise TlsConfigError(f"{flag} {path}: is a directory, expected a PEM file") from None
    except OSError as err:
        raise TlsConfigError(f"{flag} {path}: cannot be read ({err.strerror})") from None


def _no_password() -> bytes:
    # Without this, OpenSSL would ask for a passphrase on the terminal and block.
    return b""


def _check_loadable(files: TlsFiles) -> None:
    cert = _read(files.cert_path, "--tls-cert-path")
    key = _read(files.key_path, "--tls-key-path")
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise TlsConfigError(f"--tls-cert-path {files.cert_path}: not a PEM certificate (no BEGIN CERTIFICATE block)")
    if b"PRIVATE KEY-----" not in key:
        raise TlsConfigError(f"--tls-key-path {files.key_path}: not a PEM private key (no BEGIN ... PRIVATE KEY block)")
    if b"ENCRYPTED" in key:
        raise TlsConfigError(
            f"--tls-key-path {files.key_path}: the key is encrypted; give an unencrypted PEM key "
            "(e.g. `openssl pkey -in KEY -out PLAIN`)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert_path, files.key_path, password=_no_password)
    except ssl.SSLError as err:
        if "KEY_VALUES_MISMATCH" in str(err):
            raise TlsConfigError(
                f"--tls-key-path {files.key_path} is not the private key of --tls-cert-path {files.cert_path}"
            ) from None
        raise TlsConfigError(
            f"--tls-cert-path {files.cert_path} / --tls-key-path {files.key_path}: cannot be loaded ({err.reason or err})"
        ) from None
    if files.client_ca_path is None:
        return
    ca = _read(files.client_ca_path, "--tls-client-ca-cert-path")
    if b"-----BEGIN CERTIFICATE-----" not in ca:
        raise TlsConfigError(
            f"--tls-client-ca-cert-path {files.client_ca_path}: not a PEM certificate (no BEGIN CERTIFICATE block)"
        )
    try:
        context.load_verify_locations(cafile=files.client_ca_path)
    except ssl.SSLError as err:
        raise TlsConfigError(
            f"--tls-client-ca-cert-path {files.client_ca_path}: cannot be loaded ({err.reason or err})"
        ) from None


def _certificate_configuration(files: TlsFiles):
    import grpc

    root = None
    if files.client_ca_path is not None:
        root = _read(files.client_ca_path, "--tls-client-ca-cert-path")
    return grpc.ssl_server_certificate_configuration(
        [(_read(files.key_path, "--tls-key-path"), _read(files.cert_path, "--tls-cert-path"))],
        root_certificates=root,
    )


class ReloadingCredentials:
    """gRPC server credentials that follow the TLS files on disk (see the module docstring)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.reloads = 0
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._refused_stamp: tuple | None = None

    def _paths(self) -> list[str]:
        paths = [self.files.cert_path, self.files.key_path]
        if self.files.client_ca_path is not None:
            paths.append(self.files.client_ca_path)
        return paths

    def _stat(self) -> tuple:
        # os.stat follows symbolic links: a Kubernetes secret volume swaps its ..data link.
        stamps = []
        for path in self._paths():
            st = os.stat(path)
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)

    def fetch(self):
        """The new certificate configuration if the files changed and are usable, else None (keep the
        current one). Called by gRPC before each handshake; never raises."""
        with self._lock:
            try:
                stamp = self._stat()
            except OSError as err:
                stamp = ("missing", str(err))
            if stamp == self._stamp or stamp == self._refused_stamp:
                return None
            try:
                if stamp[0] == "missing":
                    raise TlsConfigError(stamp[1])
                _check_loadable(self.files)
                configuration = _certificate_configuration(self.files)
            except TlsConfigError as err:
                self._refused_stamp = stamp
                logger.warning(
                    f"The TLS files changed but cannot be used ({err}); still serving the previous "
                    f"certificate, and trying again at the next connection once they change again"
                )
                return None
            self._stamp = stamp
            self._refused_stamp = None
            self.reloads += 1
        logger.info(f"TLS certificate reloaded from {', '.join(self._paths())} (new connections use it)")
        return configuration

    def credentials(self):
        import grpc

        return grpc.dynamic_ssl_server_credentials(
            _certificate_configuration(self.files),
            self.fetch,
            require_client_authentication=self.files.mutual,
        )


def server_credentials(files: TlsFiles):
    """gRPC server credentials for ``files``, reloaded when the files change; with a client CA,
    clients without a certificate it signed are refused."""
    return ReloadingCredentials(files).credentials()

"""A throwaway certificate authority for TLS tests, made with the openssl command line.

``make_pki(directory)`` writes a CA, a server certificate for localhost /
127.0.0.1 signed by it, a client certificate signed by it, and a client
certificate from a second, unrelated CA (the one a server must refuse).
Keys are unencrypted P-256; everything is valid for two days.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate signed by another CA
    stranger_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    done = subprocess.run([OPENSSL, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed:\n{done.stderr}")


def _new_key(name: str, cwd: Path) -> Path:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key", cwd=cwd)
    return cwd / f"{name}.key"


def _ca(name: str, cwd: Path) -> tuple[Path, Path]:
    key = _new_key(name, cwd)
    _openssl(
        "req", "-x509", "-new", "-key", key, "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=cwd,
    )
    return cwd / f"{name}.pem", key


def _leaf(name: str, ca: tuple[Path, Path], extensions: str, cwd: Path) -> tuple[Path, Path]:
    key = _new_key(name, cwd)
    _openssl("req", "-new", "-key", key, "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd,
    )
    return cwd / f"{name}.pem", key


def make_pki(directory: Path) -> Pki:
    """Write the CA, server and client files into ``directory`` (which must exist)."""
    if OPENSSL is None:
        raise RuntimeError("the openssl command is needed to make test certificates")
    ca = _ca("test-ca", directory)
    other_ca = _ca("other-ca", directory)
    server = _leaf(
        "server", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n", directory
    )
    client = _leaf("client", ca, "extendedKeyUsage=clientAuth\n", directory)
    stranger = _leaf("stranger", other_ca, "extendedKeyUsage=clientAuth\n", directory)
    return Pki(ca[0], *server, *client, *stranger)

"""The optional TLS overlay (deploy/kubernetes/overlays/tls), validated offline.

It must differ from the overlay it builds on only by the Secret mount, the
launcher's TLS variables and probes the kubelet can run against a TLS server
(HTTP /health instead of native gRPC, which has no TLS), and the launcher
must accept the variables once files sit where the Secret is mounted.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from deploy_kustomize import load_documents, pod_spec, render
from kubernetes_validate.utils import all_versions
from tls_certs import make_pki

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = REPO / "deploy" / "kubernetes" / "overlays"
SERVER = "text-generation-server"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
TLS_VARS = ("TLS_CERT_PATH", "TLS_KEY_PATH", "TLS_CLIENT_CA_CERT_PATH")

_SUPPORTED = [v for v in all_versions() if tuple(map(int, v.split(".")[:2])) >= (1, 31)]
VERSIONS = sorted({_SUPPORTED[0], _SUPPORTED[-1]})


def deployment(overlay: str) -> dict[str, Any]:
    (found,) = [r for r in render(OVERLAYS / overlay) if r["kind"] == "Deployment"]
    return found


def server(resource: dict[str, Any]) -> dict[str, Any]:
    (found,) = [c for c in pod_spec(resource)["containers"] if c["name"] == SERVER]
    return found


def base_overlay() -> str:
    (kustomization,) = load_documents(OVERLAYS / "tls" / "kustomization.yaml")
    (parent,) = kustomization["resources"]
    return Path(parent).name


@pytest.mark.parametrize("version", VERSIONS)
def test_tls_overlay_validates_strictly(version):
    for resource in render(OVERLAYS / "tls"):
        kubernetes_validate.validate(resource, version, strict=True)


def test_tls_overlay_changes_only_tls_env_mount_and_probes():
    tls, plain = deployment("tls"), deployment(base_overlay())
    stripped = copy.deepcopy(tls)
    container = server(stripped)
    container["env"] = [e for e in container["env"] if e["name"] not in TLS_VARS]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "tls"]
    pod_spec(stripped)["volumes"] = [v for v in pod_spec(stripped)["volumes"] if v["name"] != "tls"]
    for probe in PROBES:
        container[probe] = server(plain)[probe]
    assert stripped == plain


def test_probes_use_http_health_because_kubelet_grpc_probes_have_no_tls():
    container = server(deployment("tls"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for probe in PROBES:
        spec = container[probe]
        assert {"grpc", "httpGet", "tcpSocket", "exec"} & set(spec) == {"httpGet"}, probe
        assert spec["httpGet"]["path"] == "/health"
        # The plaintext HTTP API's container port, where the launcher listens (the container's PORT).
        assert spec["httpGet"]["port"] == "http", probe
        assert ports["http"] == int(env["PORT"]) == 3000


def test_tls_variables_point_into_the_mounted_secret_and_the_launcher_accepts_them(tmp_path):
    from text_generation_launcher.args import parse_args

    resource = deployment("tls")
    container = server(resource)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    (volume,) = [v for v in pod_spec(resource)["volumes"] if v["name"] == "tls"]
    assert mount["readOnly"] is True
    assert volume["secret"]["defaultMode"] & 0o077 == 0o040  # group-readable (fsGroup), nothing for others
    env = {e["name"]: e["value"] for e in container["env"] if e["name"] in TLS_VARS}
    # The keys a `kubectl create secret tls` Secret holds.
    assert env == {"TLS_CERT_PATH": f"{mount['mountPath']}/tls.crt", "TLS_KEY_PATH": f"{mount['mountPath']}/tls.key"}

    # Stand a generated certificate where the Secret would be mounted, and let the launcher read the env.
    secret = tmp_path / "secret"
    secret.mkdir()
    pki = make_pki(tmp_path)
    (secret / "tls.crt").write_bytes(pki.server_cert.read_bytes())
    (secret / "tls.key").write_bytes(pki.server_key.read_bytes())
    local = {name: value.replace(mount["mountPath"], str(secret)) for name, value in env.items()}
    args = parse_args([], env=local, cuda_device_count=lambda: 0)
    assert (args.tls_cert_path, args.tls_key_path) == (str(secret / "tls.crt"), str(secret / "tls.key"))

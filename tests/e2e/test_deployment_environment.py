"""The launcher configured the way the container and the Kubernetes pod configure it.

No flags: the environment is the image's ENV (from the Dockerfile), then
the cpu overlay's ConfigMap, then the container's own env, as Kubernetes
layers them. Only what cannot hold on a test host is replaced: /data becomes
a temporary directory, the model is the tiny test checkpoint, the ports are
free ones (the pod's PORT is checked first) and there is one thread. The
pod's probes, the image's HEALTHCHECK and the autoscaler's metric must then
work against the real processes, and SIGTERM must end everything within the
pod's grace period.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from deploy_dockerfile import Dockerfile, Instruction
from deploy_kustomize import pod_spec, render
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _non_loopback_address() -> str | None:
    """An address of this host other than loopback (a pod's probes come from outside it), if any."""
    # Connecting a UDP socket sends nothing; it only picks the route's source address.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_pod_environment_serves_probes_and_stops_within_the_grace_period(launch, tiny_llama, tmp_path):
    image = Dockerfile.load(REPO / "Dockerfile").stage("cpu")
    resources = render(REPO / "deploy" / "kubernetes" / "overlays" / "cpu")
    (deployment,) = [r for r in resources if r["kind"] == "Deployment"]
    (configmap,) = [r for r in resources if r["kind"] == "ConfigMap"]
    (server,) = pod_spec(deployment)["containers"]

    env = {k: v for k, v in image.env().items() if k not in {"PATH", "HOME", "VIRTUAL_ENV"}}
    env.update(configmap["data"])
    env.update({e["name"]: e["value"] for e in server.get("env", []) if "value" in e})
    data = tmp_path / "data"
    env = {k: v.replace("/data", str(data)) if v.startswith("/data") else v for k, v in env.items()}
    env.update(MODEL_ID=str(tiny_llama), OMP_NUM_THREADS="1")
    assert env["HOSTNAME"] == "0.0.0.0" and env["NUM_SHARD"] == "1"
    # The pod's PORT (its `http` container port) wins over the image's PORT=80, which a non-root pod cannot bind.
    assert image.env()["PORT"] == "80"
    assert env["PORT"] == str({p["name"]: p["containerPort"] for p in server["ports"]}["http"])

    started = launch([], env=env)

    # The probes: grpc.health.v1, empty service name, on the pod's address.
    address = _non_loopback_address()
    for host in ["127.0.0.1", *([address] if address else [])]:
        with grpc.insecure_channel(f"{host}:{started.grpc_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, host

    # The image's HEALTHCHECK command, with python from this environment.
    _, rest = image.last("HEALTHCHECK").flags_and_rest()
    argv = Instruction("CMD", rest[4:], 0).exec_form()
    done = subprocess.run(
        [sys.executable, *argv[1:]], env={**os.environ, "PORT": str(started.http_port)}, capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr.decode()[-500:]

    # The autoscaler's metric, on the port Prometheus scrapes.
    with urllib.request.urlopen(f"http://127.0.0.1:{started.http_port}/metrics", timeout=10) as reply:
        assert re.search(r"^tgi_queue_size 0(\.0)?$", reply.read().decode(), re.M)

    # SIGTERM after the preStop sleep: everything must be gone before the kubelet's SIGKILL.
    budget = pod_spec(deployment)["terminationGracePeriodSeconds"] - server["lifecycle"]["preStop"]["sleep"]["seconds"]
    begin = time.monotonic()
    code = started.stop(timeout=budget)
    assert code == 0, started.log_tail()
    assert time.monotonic() - begin < budget

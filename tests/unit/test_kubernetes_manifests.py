"""The Kubernetes manifests under deploy/kubernetes, validated offline.

Every base file and every rendered overlay passes ``kubernetes-validate
--strict`` (unknown fields rejected) for the oldest and newest Kubernetes it
ships schemas for. There is no kustomize binary here, so
tests/deploy_kustomize.py renders the overlays (and refuses any field it
does not model). The facts the deployment depends on are then checked
against their sources: the launcher's own flag parser reads the ConfigMap,
the Dockerfile gives the image's user, the router's metrics give the
autoscaler's metric name.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_dockerfile import Dockerfile
from deploy_kustomize import (
    KustomizeError,
    find_kustomization,
    load_documents,
    pod_spec,
    render,
    split_image,
    strategic_merge,
)
from kubernetes_validate.utils import all_versions

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
BASE = KUBE / "base"
OVERLAYS = ("cpu", "gpu")
SERVER = "text-generation-server"  # the main container's name
IMAGE = "text-generation-server"

# The oldest shipped schema at or above 1.31, and the newest.
_SUPPORTED = [v for v in all_versions() if tuple(map(int, v.split(".")[:2])) >= (1, 31)]
VERSIONS = sorted({_SUPPORTED[0], _SUPPORTED[-1]})


def rendered(overlay: str) -> list[dict[str, Any]]:
    return render(KUBE / "overlays" / overlay)


def one(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [r for r in resources if r["kind"] == kind]
    return found


def container(resource: dict[str, Any], name: str = SERVER) -> dict[str, Any]:
    (found,) = [c for c in pod_spec(resource)["containers"] if c["name"] == name]
    return found


def container_env(c: dict[str, Any], resources: list[dict[str, Any]]) -> dict[str, str]:
    """The environment Kubernetes gives a container: envFrom ConfigMaps, then env values."""
    env: dict[str, str] = {}
    configmaps = {r["metadata"]["name"]: r for r in resources if r["kind"] == "ConfigMap"}
    for source in c.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in configmaps, f"envFrom names ConfigMap {name!r}, which is not deployed"
        env.update(configmaps[name].get("data", {}))
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def launcher_args(overlay: str):
    """The launcher's own reading of the pod's environment (what it would start)."""
    from text_generation_launcher.args import parse_args

    resources = rendered(overlay)
    deployment = one(resources, "Deployment")
    env = container_env(container(deployment), resources)
    gpus = int(container(deployment)["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
    return parse_args([], env=env, cuda_device_count=lambda: gpus), env


def quantity_cpu(value: str | int) -> float:
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def all_manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.rglob("*.yaml"))


# ---------------------------------------------------------------------------
# The renderer itself
# ---------------------------------------------------------------------------


def test_renderer_merges_keyed_lists_and_replaces_the_rest():
    base = {
        "spec": {
            "containers": [
                {"name": "a", "image": "x", "env": [{"name": "K", "value": "1"}], "args": ["--one"]},
                {"name": "b", "image": "y"},
            ],
            "tolerations": [{"key": "old"}],
            "volumes": [{"name": "v", "emptyDir": {"medium": "Memory"}}],
            "drop": "me",
        }
    }
    patch = {
        "spec": {
            "containers": [{"name": "a", "env": [{"name": "K", "value": "2"}, {"name": "L", "value": "3"}], "args": ["--two"]}],
            "tolerations": [{"key": "new"}],
            "volumes": [{"name": "v", "emptyDir": {"sizeLimit": "1Gi"}}],
            "drop": None,
        }
    }
    merged = strategic_merge(base, patch)["spec"]
    a, b = merged["containers"]
    assert a == {"name": "a", "image": "x", "env": [{"name": "K", "value": "2"}, {"name": "L", "value": "3"}], "args": ["--two"]}
    assert b == {"name": "b", "image": "y"}
    assert merged["tolerations"] == [{"key": "new"}]
    assert merged["volumes"] == [{"name": "v", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}]
    assert "drop" not in merged
    with pytest.raises(KustomizeError, match="directives"):
        strategic_merge(base, {"spec": {"$patch": "replace"}})


def test_renderer_sets_images_and_refuses_fields_it_does_not_model(tmp_path):
    assert split_image("reg.io:5000/team/app:1.2@sha256:ab") == ("reg.io:5000/team/app", "1.2", "sha256:ab")
    assert split_image("app") == ("app", None, None)
    (tmp_path / "deploy.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c, image: app}]\n"
    )
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [deploy.yaml]\nimages: [{name: app, newName: reg.io/app, newTag: '2'}]\n"
    )
    (pod,) = render(tmp_path)
    assert pod["spec"]["containers"][0]["image"] == "reg.io/app:2"
    (tmp_path / "kustomization.yaml").write_text("resources: [deploy.yaml]\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)


# ---------------------------------------------------------------------------
# Files and kustomizations
# ---------------------------------------------------------------------------


def test_every_file_is_part_of_a_kustomization():
    used: set[Path] = set()
    # Every overlay directory, including optional ones built on cpu/gpu (overlays/tls).
    for directory in [BASE, *sorted(p for p in (KUBE / "overlays").iterdir() if p.is_dir())]:
        kfile = find_kustomization(directory)
        used.add(kfile)
        (kustomization,) = load_documents(kfile)
        for entry in kustomization.get("resources", []):
            target = (directory / entry).resolve()
            assert target.exists(), f"{kfile}: {entry} does not exist"
            used.add(target)
        for patch in kustomization.get("patches", []):
            used.add((directory / patch["path"]).resolve())
    orphans = [p.relative_to(REPO) for p in all_manifest_files() if p.resolve() not in used]
    assert not orphans, f"manifests no kustomization uses: {orphans}"
    for overlay in OVERLAYS:
        (kustomization,) = load_documents(find_kustomization(KUBE / "overlays" / overlay))
        assert kustomization["resources"] == ["../../base"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_kind_once(overlay):
    kinds = sorted(r["kind"] for r in rendered(overlay))
    assert kinds == sorted(
        ["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]
    )


# ---------------------------------------------------------------------------
# Schema validation (kubernetes-validate --strict)
# ---------------------------------------------------------------------------


def _validate(resource: dict[str, Any], version: str) -> None:
    problem = None
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        problem = f"{resource['kind']}/{resource['metadata']['name']} against {version}: {path}: {err.message}"
    if problem:
        pytest.fail(problem, pytrace=False)


@pytest.mark.parametrize("version", VERSIONS)
def test_base_manifests_validate_strictly(version):
    (kustomization,) = load_documents(find_kustomization(BASE))
    count = 0
    for entry in kustomization["resources"]:
        for resource in load_documents(BASE / entry):
            _validate(resource, version)
            count += 1
    assert count == 6


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates_strictly(overlay, version):
    for resource in rendered(overlay):
        _validate(resource, version)


def test_kubernetes_validate_command_accepts_every_manifest(tmp_path):
    files = []
    (kustomization,) = load_documents(find_kustomization(BASE))
    files += [str(BASE / entry) for entry in kustomization["resources"]]
    for overlay in OVERLAYS:
        out = tmp_path / f"{overlay}.yaml"
        out.write_text(yaml.safe_dump_all(rendered(overlay)))
        files.append(str(out))
    tool = Path(sys.executable).parent / "kubernetes-validate"
    command = [str(tool)] if tool.exists() else [sys.executable, "-m", "kubernetes_validate"]
    args = [a for v in VERSIONS for a in ("-k", f"{v}.0")]
    done = subprocess.run([*command, "--strict", *args, *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARN" not in done.stdout and "ERROR" not in done.stdout, done.stdout
    assert done.stdout.count("passed") == (6 + 6 * len(OVERLAYS)) * len(VERSIONS)


# ---------------------------------------------------------------------------
# The pod: probes, shared memory, shutdown, security, resources
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_grpc_health_on_the_launchers_grpc_port(overlay):
    args, _ = launcher_args(overlay)
    server = container(one(rendered(overlay), "Deployment"))
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["grpc"] == args.grpc_port == 8033
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = server[probe]
        handlers = {"grpc", "httpGet", "tcpSocket", "exec"} & set(spec)
        assert handlers == {"grpc"}, f"{probe} uses {handlers}"
        # No service name: the router's overall status (the empty service).
        assert spec["grpc"] == {"port": 8033}, probe


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_startup_probe_allows_thirty_minutes_of_model_loading(overlay):
    startup = container(one(rendered(overlay), "Deployment"))["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 30 * 60


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dev_shm_is_a_memory_backed_empty_dir(overlay):
    deployment = one(rendered(overlay), "Deployment")
    (mount,) = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    assert "sizeLimit" in volume["emptyDir"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_launchers_drain_and_shutdown(overlay):
    args, _ = launcher_args(overlay)
    deployment = one(rendered(overlay), "Deployment")
    pre_stop = container(deployment).get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    # Router: drain then its shutdown timeout; then the shards: their shutdown timeout.
    needed = pre_stop + args.drain_timeout + args.shutdown_timeout + args.shutdown_timeout
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace >= needed + 5, f"grace {grace} s < {needed} s needed + 5 s margin"
    assert grace <= needed + 30, "a much longer grace only delays restarts of a stuck pod"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_restricted(overlay):
    """Pod Security Standard "restricted", with the image's own numeric user."""
    image_user = Dockerfile.load(REPO / "Dockerfile").stage("cpu").last("USER").value
    uid, _, gid = image_user.partition(":")
    spec = pod_spec(one(rendered(overlay), "Deployment"))
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == int(uid) and pod["runAsGroup"] == int(gid)
    assert pod["fsGroup"] == int(gid)  # the /data volume becomes writable by the image's user
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert not sc.get("privileged"), c["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_requests_cpu_and_memory_and_caps_memory(overlay):
    spec = pod_spec(one(rendered(overlay), "Deployment"))
    for c in spec.get("initContainers", []) + spec["containers"]:
        resources = c["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), c["name"]
        assert "memory" in resources["limits"], c["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_threads_per_shard_fit_the_cpus_the_pod_gets(overlay):
    args, env = launcher_args(overlay)
    resources = container(one(rendered(overlay), "Deployment"))["resources"]
    threads = int(env["OMP_NUM_THREADS"]) * args.num_shard
    assert threads <= quantity_cpu(resources["requests"]["cpu"])
    if "cpu" in resources.get("limits", {}):
        assert threads <= quantity_cpu(resources["limits"]["cpu"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_launcher_listens_on_all_interfaces_without_service_link_variables(overlay):
    args, env = launcher_args(overlay)
    deployment = one(rendered(overlay), "Deployment")
    # The runtime's HOSTNAME (the pod name) is overridden by the container's env.
    assert {"name": "HOSTNAME", "value": "0.0.0.0"} in container(deployment)["env"]
    assert args.hostname == "0.0.0.0"
    assert pod_spec(deployment)["enableServiceLinks"] is False


def image_env(overlay: str) -> dict[str, str]:
    """The ENV of the Dockerfile target the overlay's main container runs (cpu for a -cpu tag, else cuda)."""
    _, tag, _ = split_image(container(one(rendered(overlay), "Deployment"))["image"])
    target = "cpu" if tag and tag.endswith("-cpu") else "cuda"
    return Dockerfile.load(REPO / "Dockerfile").stage(target).env()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_serves_http_on_its_http_container_port_not_the_images_port_80(overlay):
    """The image's PORT=80 binds under Docker only (it sets net.ipv4.ip_unprivileged_port_start=0).

    A pod running as uid 1000 with every capability dropped cannot bind below
    1024, so the container's env sets PORT to the `http` containerPort, over
    the image's ENV (Kubernetes layers the container's env over the image's).
    """
    from text_generation_launcher.args import parse_args

    resources = rendered(overlay)
    deployment = one(resources, "Deployment")
    server = container(deployment)
    image = image_env(overlay)
    assert image["PORT"] == "80"
    env = {**image, **container_env(server, resources)}
    args = parse_args([], env=env, cuda_device_count=lambda: 0)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert {"name": "PORT", "value": str(ports["http"])} in server["env"]
    assert args.port == ports["http"] == 3000
    assert args.grpc_port == ports["grpc"] == 8033
    assert pod_spec(deployment)["securityContext"]["runAsUser"] != 0
    assert server["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert min(ports.values()) >= 1024, "a non-root pod without NET_BIND_SERVICE cannot bind it"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_caches_are_on_the_persistent_volume(overlay):
    resources = rendered(overlay)
    deployment = one(resources, "Deployment")
    (mount,) = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == "/data"]
    (volume,) = [v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == one(resources, "PersistentVolumeClaim")["metadata"]["name"]
    env = container_env(container(deployment), resources)
    assert env["HUGGINGFACE_HUB_CACHE"] == "/data"
    assert env["TEXT_GENERATION_CACHE"].startswith("/data/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_is_a_valid_launcher_configuration(overlay):
    args, env = launcher_args(overlay)  # raises ArgsError on a contradiction
    deployment = one(rendered(overlay), "Deployment")
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert (args.grpc_port, args.port) == (ports["grpc"], ports["http"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.port)
    assert annotations["prometheus.io/path"] == "/metrics"


# ---------------------------------------------------------------------------
# Overlay specifics
# ---------------------------------------------------------------------------


def test_gpu_overlay_asks_for_one_gpu_per_shard_on_the_cuda_image():
    args, env = launcher_args("gpu")
    resources = rendered("gpu")
    deployment = one(resources, "Deployment")
    server = container(deployment)
    assert int(server["resources"]["limits"]["nvidia.com/gpu"]) == args.num_shard >= 2
    assert env["SHARDED"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(deployment)["tolerations"]
    name, tag, _ = split_image(server["image"])
    assert name == IMAGE and tag and not tag.endswith("-cpu")


def test_cpu_overlay_uses_the_cpu_image_and_no_gpu():
    resources = rendered("cpu")
    spec = pod_spec(one(resources, "Deployment"))
    for c in spec.get("initContainers", []) + spec["containers"]:
        assert "nvidia.com/gpu" not in str(c.get("resources")), c["name"]
        name, tag, _ = split_image(c["image"])
        assert name == IMAGE and tag and tag.endswith("-cpu")
    assert "tolerations" not in spec


def test_gpu_init_container_downloads_the_configured_model_into_the_volume(tmp_path):
    resources = rendered("gpu")
    deployment = one(resources, "Deployment")
    (init,) = pod_spec(deployment)["initContainers"]
    assert init["image"] == container(deployment)["image"]
    assert {"name": "data", "mountPath": "/data"} in init["volumeMounts"]
    env = container_env(init, resources)
    assert env["MODEL_ID"] == container_env(container(deployment), resources)["MODEL_ID"]
    # Run its command with a stand-in text-generation-server that prints its arguments.
    fake = tmp_path / "text-generation-server"
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do printf '[%s]' \"$a\"; done\n")
    fake.chmod(0o755)
    base_env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "MODEL_ID": env["MODEL_ID"]}
    for extra, expected in (
        ({}, f"[download-weights][{env['MODEL_ID']}]"),
        ({"REVISION": "main"}, f"[download-weights][{env['MODEL_ID']}][--revision][main]"),
    ):
        done = subprocess.run(init["command"], env={**base_env, **extra}, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout == expected


# ---------------------------------------------------------------------------
# Service, disruption budget, autoscaler
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_exposes_grpc_and_the_http_api_on_the_pods_named_ports(overlay):
    args, env = launcher_args(overlay)
    resources = rendered(overlay)
    deployment = one(resources, "Deployment")
    service = one(resources, "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"grpc", "http"}
    named = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert set(named) == set(ports)
    for name, port in ports.items():
        # By name, so the Service follows the container port; each to the port of its own name.
        assert port["targetPort"] == name and port["protocol"] == "TCP", name
    assert ports["grpc"]["port"] == named["grpc"] == args.grpc_port == 8033
    assert ports["grpc"]["appProtocol"] == "grpc"
    # The HTTP API on the Service's port 80, where TGI's image (and this one: ENV PORT=80) serves it,
    # reaching the pod's `http` port, on which the launcher listens (the container's PORT).
    assert ports["http"]["port"] == int(image_env(overlay)["PORT"]) == 80
    assert ports["http"]["appProtocol"] == "http"
    assert named["http"] == int(env["PORT"]) == args.port == 3000


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budget_covers_the_pods_and_never_blocks_a_drain(overlay):
    resources = rendered(overlay)
    pdb = one(resources, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    labels = one(resources, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # minAvailable: 1 with one replica would forbid every eviction.
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_scales_the_deployment_on_the_routers_queue_size(overlay):
    from text_generation_router.metrics import RouterMetrics

    resources = rendered(overlay)
    hpa = one(resources, "HorizontalPodAutoscaler")
    deployment = one(resources, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], "Deployment", deployment["metadata"]["name"]
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "tgi_queue_size"
    # The router exports it as a gauge on /metrics.
    exposition = RouterMetrics().render().decode()
    assert re.search(rf"^# TYPE {name} gauge$", exposition, re.M)
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # A replicas field in the Deployment would reset the autoscaler's count on every apply.
    assert "replicas" not in deployment["spec"]


def test_readme_documents_the_deployment():
    readme = (REPO / "deploy" / "README.md").read_text()
    for needed in (
        "kubectl apply -k deploy/kubernetes/overlays/cpu",
        "kubectl apply -k deploy/kubernetes/overlays/gpu",
        "prometheus-adapter",
        "tgi_queue_size",
        "terminationGracePeriodSeconds",
        "ReadWriteMany",
        "--shm-size",
        "kubernetes-validate",
    ):
        assert needed in readme, needed

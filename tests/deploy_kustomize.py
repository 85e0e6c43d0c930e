"""A minimal kustomize for tests on a host without the kustomize binary.

It renders what the project's kustomizations use and refuses anything else
(so an unsupported field fails the test instead of being ignored):
``resources`` (files or directories holding a kustomization.yaml),
``patches`` given as a ``path`` to a strategic-merge patch (its kind and
name select the target), and ``images`` (``newName``, ``newTag``,
``digest``). Strategic merge follows Kubernetes' rules for the fields these
manifests patch: maps merge, ``null`` deletes a key, lists of containers,
volumes, env, volume mounts and ports merge by their key, other lists are
replaced.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}

# Lists merged by key in a strategic-merge patch (field name -> merge key).
# Container "ports" merge by containerPort, Service "ports" by port.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not model, or does not apply."""


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a file."""
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def find_kustomization(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise KustomizeError(f"{directory} has no kustomization.yaml")


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources ``kubectl apply -k directory`` would send."""
    kfile = find_kustomization(directory)
    (kustomization,) = load_documents(kfile)
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise KustomizeError(f"{kfile}: fields {sorted(unsupported)} are not supported by this renderer")
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{kfile}: kind must be Kustomization")

    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            resources.extend(render(target))
        elif target.is_file():
            resources.extend(load_documents(target))
        else:
            raise KustomizeError(f"{kfile}: resource {entry!r} does not exist")

    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise KustomizeError(f"{kfile}: only `patches: - path: FILE` is supported, got {patch_entry}")
        patch_file = directory / patch_entry["path"]
        if not patch_file.is_file():
            raise KustomizeError(f"{kfile}: patch {patch_entry['path']!r} does not exist")
        for patch in load_documents(patch_file):
            _apply_patch(resources, patch, patch_file)

    for image in kustomization.get("images", []):
        unknown = set(image) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise KustomizeError(f"{kfile}: image fields {sorted(unknown)} are not supported")
        hits = sum(_set_image(r, image) for r in resources)
        if hits == 0:
            raise KustomizeError(f"{kfile}: image {image['name']!r} is used by no container")
    return resources


def _identity(resource: dict[str, Any]) -> tuple[str, str, str | None]:
    meta = resource.get("metadata", {})
    return resource["kind"], meta.get("name", ""), meta.get("namespace")


def _apply_patch(resources: list[dict[str, Any]], patch: dict[str, Any], source: Path) -> None:
    ident = _identity(patch)
    matches = [i for i, r in enumerate(resources) if _identity(r) == ident]
    if len(matches) != 1:
        raise KustomizeError(f"{source}: patch for {ident[0]}/{ident[1]} matches {len(matches)} resources")
    index = matches[0]
    if patch.get("apiVersion") != resources[index].get("apiVersion"):
        raise KustomizeError(f"{source}: apiVersion {patch.get('apiVersion')} differs from the target's")
    resources[index] = strategic_merge(resources[index], patch)


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    """``base`` with ``patch`` applied by Kubernetes' strategic-merge rules (the subset described above)."""
    if isinstance(patch, dict):
        if any(isinstance(k, str) and k.startswith("$") for k in patch):
            raise KustomizeError(f"patch directives {[k for k in patch if k.startswith('$')]} are not supported")
        if not isinstance(base, dict):
            return copy.deepcopy(patch)
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(patch, list) and isinstance(base, list):
        key = _merge_key(field, base + patch)
        if key is None:
            return copy.deepcopy(patch)
        merged = copy.deepcopy(base)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise KustomizeError(f"list {field!r}: every patch item needs its merge key {key!r}")
            for i, existing in enumerate(merged):
                if existing.get(key) == item[key]:
                    merged[i] = strategic_merge(existing, item)
                    break
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(patch)


def _merge_key(field: str | None, items: list[Any]) -> str | None:
    if field == "ports":
        dicts = [i for i in items if isinstance(i, dict)]
        if dicts and all("containerPort" in i for i in dicts):
            return "containerPort"
        if dicts and all("port" in i for i in dicts):
            return "port"
        return None
    return MERGE_KEYS.get(field or "")


def pod_spec(resource: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a workload (Deployment, StatefulSet, Job, ...) or a Pod, else None."""
    if resource.get("kind") == "Pod":
        return resource.get("spec")
    template = resource.get("spec", {}).get("template")
    if isinstance(template, dict):
        return template.get("spec")
    return None


def _set_image(resource: dict[str, Any], image: dict[str, str]) -> int:
    spec = pod_spec(resource)
    if spec is None:
        return 0
    hits = 0
    for group in ("initContainers", "containers"):
        for container in spec.get(group, []):
            name, tag, digest = split_image(container["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{name}@{image['digest']}"
            else:
                tag = image.get("newTag", tag)
                container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
            hits += 1
    return hits


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """``registry/name:tag@digest`` -> (registry/name, tag, digest)."""
    ref, _, digest = ref.partition("@")
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :], digest or None
    return ref, None, digest or None

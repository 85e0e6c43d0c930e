"""What a quantization run has finished, kept on disk so ``--resume`` continues it.

Beside OUTPUT_DIR, in ``.OUTPUT_DIR.progress/``: the run's settings (``run.json``), each
finished layer's packed tensors and error reports (``layer-NNNNN.safetensors``, its reports in
the file's metadata; written as soon as the layer is done, so no layer's tensors stay in memory,
and read back by the checkpoint writer) and the calibration activations leaving the last saved
layer (``hidden-NNNNN.safetensors``, one tensor per batch, written and read a batch at a time). The activations are saved at most every ``every_s`` seconds (they
are as large as the calibration set times the hidden size; layers finished since the last save
are redone on resume). Every file is written to a temporary name and renamed into place, so a
process killed at any moment leaves only whole files; the activations are written before the
layers' tensors and the previous activations removed only after them, so the last activations
whose layers are all on disk always mark where to continue.
A run that finishes removes the directory; one that stops keeps it. ``--resume`` refuses a
directory written with other settings.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from safetensors.torch import save_file

from text_generation_server.quantize.writer import OutputDirError


class RunProgress:
    def __init__(self, output_dir: Path, settings: dict[str, Any], every_s: float = 60.0) -> None:
        self.dir = self.path_for(output_dir)
        self.settings = settings
        self.every_s = every_s

    @staticmethod
    def path_for(output_dir: Path) -> Path:
        output_dir = Path(output_dir).resolve()
        return output_dir.parent / f".{output_dir.name}.progress"

    @staticmethod
    def describe(spec: Any, windows: torch.Tensor, model_path: Path, true_sequential: bool) -> dict[str, Any]:
        """What must match for a run to continue another: the model, settings and calibration."""
        return {
            "model": str(Path(model_path).resolve()),
            "spec": asdict(spec),
            "true_sequential": true_sequential,
            "windows": list(windows.shape),
            "windows_checksum": int(windows.to(torch.int64).sum()) * 1_000_003 + int((windows[:, :8] * 31).sum()),
        }

    def start(self, resume: bool) -> int:
        """Prepare the directory; the number of layers already finished (0 for a fresh run)."""
        if self.dir.exists() and not resume:
            logger.warning(f"discarding the progress of an earlier run in {self.dir} (pass --resume to continue it)")
            shutil.rmtree(self.dir)
        if not self.dir.exists():
            self.dir.mkdir()
            self._write_json("run.json", self.settings)
            if resume:
                logger.info("--resume: no earlier run to continue; starting from the first layer")
            return 0
        saved = json.loads((self.dir / "run.json").read_text())
        if saved != self.settings:
            differ = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
            raise OutputDirError(
                f"--resume: the run in {self.dir} was started with other {', '.join(differ)}; "
                f"run without --resume to start over"
            )
        done = self.finished_layers()
        logger.info(f"--resume: {done} layer(s) finished by an earlier run; continuing from layer {done + 1}")
        return done

    def finished_layers(self) -> int:
        """Layers 0..n-1 are on disk with the activations after layer n-1: n (largest such)."""
        saved = sorted((int(p.stem.split("-")[1]) for p in self.dir.glob("hidden-*.safetensors")), reverse=True)
        for last in saved:
            if all((self.dir / f"layer-{i:05d}.safetensors").exists() for i in range(last + 1)):
                return last + 1
        return 0

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor], reports: list[Any]) -> None:
        """One finished layer's packed tensors and error reports."""
        meta = {"reports": json.dumps([asdict(r) for r in reports])}
        packed = {k: v.contiguous() for k, v in tensors.items()}
        self._atomic(f"layer-{index:05d}.safetensors", lambda path: save_file(packed, str(path), metadata=meta))

    def save_hidden(self, index: int, hidden: Any) -> None:
        """The activations leaving layer ``index`` (an ActivationList; its layer file and all
        before it are saved)."""
        name = f"hidden-{index:05d}.safetensors"
        self._atomic(name, lambda path: hidden.save(path))
        for old in self.dir.glob("hidden-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    @property
    def spill_dir(self) -> Path:
        """Where calibration activations beyond the memory budget are kept while the run lasts
        (``.OUTPUT_DIR.activations/``, beside the progress; removed when the run ends either way)."""
        return self.dir.parent / (self.dir.name.removesuffix(".progress") + ".activations")

    def load(self, done: int, report_cls: type) -> tuple[list[Any], Path]:
        """The reports of the ``done`` finished layers and the file of the activations after them
        (the layers' tensors stay on disk: :meth:`packed_tensors`)."""
        from safetensors import safe_open

        reports: list[Any] = []
        for i in range(done):
            with safe_open(str(self.dir / f"layer-{i:05d}.safetensors"), framework="pt") as f:
                for r in json.loads(f.metadata()["reports"]):
                    r["shape"] = tuple(r["shape"])
                    reports.append(report_cls(**r))
        return reports, self.dir / f"hidden-{done - 1:05d}.safetensors"

    def packed_tensors(self, layers: int) -> dict[str, Any]:
        """Every saved layer's packed tensors as the writer takes them (read when written)."""
        from safetensors import safe_open

        from text_generation_server.quantize.checkpoint import _TORCH_DTYPES
        from text_generation_server.quantize.writer import PendingTensor

        def loader(path: Path, name: str):
            def load() -> torch.Tensor:
                with safe_open(str(path), framework="pt") as f:
                    return f.get_tensor(name)
            return load

        pending: dict[str, Any] = {}
        for i in range(layers):
            path = self.dir / f"layer-{i:05d}.safetensors"
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    pending[name] = PendingTensor(_TORCH_DTYPES[view.get_dtype()], tuple(view.get_shape()),
                                                  loader(path, name))
        return pending

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _write_json(self, name: str, value: Any) -> None:
        self._atomic(name, lambda path: path.write_text(json.dumps(value, indent=1)))

    def _atomic(self, name: str, write) -> None:
        tmp = self.dir / f".{name}.tmp"
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)

"""The execution plan interface, the module plan, and the one choice between plans."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from loguru import logger

from text_generation_server.kernels.config import KernelConfig
from text_generation_server.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from text_generation_server.models.base import CausalLM


class ExecutionPlan(ABC):
    """Runs forwards of one loaded model; chosen once, then only called."""

    name: ClassVar[str]

    def __init__(self, model: CausalLM) -> None:
        self.model = model

    @classmethod
    @abstractmethod
    def build(cls, model: CausalLM, kernels: KernelConfig) -> ExecutionPlan | str:
        """This plan for ``model``, or why it cannot run it (a reason for the log)."""

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` after the final norm, as ``model.forward`` gives them."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)

    @abstractmethod
    def describe(self) -> str:
        """How decode and prefill steps run, for the start-up line."""


class ModulePlan(ExecutionPlan):
    """The model's own modules for every step: any device, any dtype."""

    name = "modules"

    def __init__(self, model: CausalLM, why: str = "") -> None:
        super().__init__(model)
        self.why = why

    @classmethod
    def build(cls, model: CausalLM, kernels: KernelConfig) -> ModulePlan:
        return cls(model)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn)

    def describe(self) -> str:
        return "torch modules for every step" + (f" ({self.why})" if self.why else "")


def _plan_order() -> list[type[ExecutionPlan]]:
    from text_generation_server.execution.native import NativeCpuLayersPlan, NativeCpuStackPlan

    return [NativeCpuStackPlan, NativeCpuLayersPlan]


def choose_plan(model: CausalLM, kernels: KernelConfig, prefer: str | None = None) -> ExecutionPlan:
    """The first plan of :func:`_plan_order` that runs ``model``, else :class:`ModulePlan`
    (naming why the first candidate could not); builds the LM head's kernel; logs one line.

    ``prefer`` (a plan name) limits the choice to that plan and the module plan (tests
    compare plans on one model).
    """
    head = model.lm_head.choose_kernel(kernels) if hasattr(model, "lm_head") else "none"
    order = _plan_order()
    if prefer is not None:
        known = [p.name for p in order] + [ModulePlan.name]
        if prefer not in known:
            raise ValueError(f"unknown execution plan {prefer!r}; known: {', '.join(known)}")
        order = [p for p in order if p.name == prefer]
    plan: ExecutionPlan | None = None
    reasons: list[str] = []
    for cls in order:
        built = cls.build(model, kernels)
        if isinstance(built, ExecutionPlan):
            plan = built
            break
        reasons.append(f"{cls.name}: {built}")
    if plan is None:
        plan = ModulePlan(model, reasons[0] if reasons else "")
    kernel_names = getattr(model, "kernel", "?")
    logger.info(
        f"Execution plan: {plan.name} on {model.device}, {str(model.dtype).removeprefix('torch.')}: "
        f"{plan.describe()}; linear kernels {kernel_names}; LM head {head}"
    )
    for why in reasons[1:]:
        logger.debug(f"Execution plan not taken: {why}")
    return plan

"""How a loaded model runs: the execution plan, chosen once at load.

A model is plain torch modules plus a declarative spec of its decoder layers
(``models/spec.py``). :func:`choose_plan` looks at that spec, the device and
the kernels this process can run, and picks the fastest plan that can execute
every layer, in this order:

- ``native-cpu-stack`` (``native.py``): one unsplit model on a CPU with the
  native kernels; a decode step of the whole decoder stack is one call into
  ``tgs_cpu.DecoderStack`` (C++, ``kernels/csrc/decoder.cpp``);
- ``native-cpu-layers``: the same layers on several shards, one call per half
  layer with the all-reduce between them;
- ``modules`` (``plan.py``): the model's own ``forward``, on any device and
  dtype; prefill steps of the native plans take it too.

The plan also builds the LM head's kernel (``layers/lm_head_kernels.py``).
It is logged in one line at load; the engine runs every forward through
``plan.forward`` and never asks which plan it holds.

Adding a fast path (a CUDA plan: paged-attention kernels, tuned 4-bit GEMM,
graphs) is one :class:`ExecutionPlan` class with ``build(model, kernels) -> plan
or reason``, placed in ``plan._plan_order``; models do not change.
"""

from text_generation_server.execution.plan import ExecutionPlan, ModulePlan, choose_plan

__all__ = ["ExecutionPlan", "ModulePlan", "choose_plan"]

"""The compiled denoiser: ``torch.compile`` once per batch shape the schedule produces, compiles counted.

Pruning changes the denoiser's batch mid-rollout, which is why RL rollouts are usually left eager:
a compiler that specialises on shapes recompiles at every new size. In Pro-GRPO the sizes are
known in advance and few: the live rows of each stage of the schedule (times the prompts per
rank, in ``sample_batch_size`` chunks, doubled by CFG), the update's ``train_batch_size`` and the
last, shorter minibatch of an epoch. So the denoiser is compiled with static shapes
(``dynamic=False``: one specialised graph per size, no dynamic-shape kernels) and a recompile
limit large enough to hold every size of a run; the first rollout and update compile them all
(the warm-up), and later rollouts only look graphs up.

``DenoiserCompiler`` is the ``backend`` handed to ``torch.compile``: it counts every graph it is
asked to compile (with the shape of its first input) and hands the graph to the named compiler
("inductor", or "aot_eager" for tests: the same tracing, no code generation). Counting our own
backend's calls needs no private counters; a recompile after the warm-up is then visible as a
rising ``compile/graphs`` metric, and ``torch.compiler.set_stance("fail_on_recompile")`` (public)
turns one into an error, which the tests use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

#: torch.compile backends that run on every device; ``compile_backend`` must name one of these or
#: one ``torch.compiler.list_backends()`` lists.
DEBUG_BACKENDS = ("eager", "aot_eager")

#: Graphs one denoiser may hold: stages x chunks x (sampling, training, reference) x CFG is far below.
RECOMPILE_LIMIT = 64


def check_compile_backend(name: str) -> str:
    """Refuse, before any model loads, a ``compile_backend`` torch does not have."""
    known = (*DEBUG_BACKENDS, *torch.compiler.list_backends())
    if name not in known:
        raise ValueError(f"compile_backend={name!r}: not a torch.compile backend here; choose one of {sorted(known)}")
    return name


class DenoiserCompiler:
    """A ``torch.compile`` backend that counts its compilations, then delegates to ``backend``.

    ``graphs``: graphs compiled so far (one per new input shape or grad mode, plus one per graph
    break); ``shapes``: the first input's shape of each. A graph break would show as several graphs
    per shape; the tiny models compile to one graph per shape (a test).
    """

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = check_compile_backend(backend)
        self.graphs = 0
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        # Composing backends the way PyTorch's "custom backends" guide does (lookup_backend by name).
        from torch._dynamo import lookup_backend

        self.graphs += 1
        first = next((tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)), ())
        self.shapes.append(first)
        return lookup_backend(self.backend)(gm, example_inputs)

    def metrics(self) -> dict[str, float]:
        """What a rollout logs: ``compile/graphs``, the running count (flat after the warm-up)."""
        return {"compile/graphs": float(self.graphs)}


def compile_denoiser(net: nn.Module, compiler: DenoiserCompiler) -> None:
    """Compile ``net``'s forward in place (``nn.Module.compile``: parameter names, state dicts, LoRA
    and gradient-checkpointing settings stay the module's own), static shapes, counted by ``compiler``."""
    net.compile(backend=compiler, dynamic=False, recompile_limit=RECOMPILE_LIMIT)

"""torch.compile for a model's transformers, scoped and reversible.

Only `forward` is compiled, not the module: the hooks paro installs (the interceptor's pre-hook,
which reads the grid, text layout and timestep and picks the plan's timestep slot) run in
`Module.__call__`, around it, in Python. What they change, the compiled graph reads as data: the
plan's orders and masks sit in buffers refilled in place, so a new slot needs no recompile. paro's
kernels are torch custom ops (kernels/paro_kernels/ops.py): one opaque node each in the graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


@contextlib.contextmanager
def compiled_forwards(transformers: Iterable[torch.nn.Module], fullgraph: bool) -> Iterator[None]:
    """Each transformer's forward through torch.compile inside the block; as it was after (an
    instance-level forward, e.g. accelerate's offload wrapper, is put back too).
    fullgraph: a graph break is an error (what the step bench checks) rather than a split.

    Each block starts from an empty compile cache: dynamo keeps compiled code on the code object,
    and diffusers' transformers share one (the decorator wrapping their forwards), whose entries
    are capped at 8. Blocks that each installed other processors or handlers (the step bench's
    variants) would otherwise fill it, and a fullgraph compile past the cap fails."""
    saved = [(tr, vars(tr).get("forward")) for tr in transformers]
    torch.compiler.reset()
    try:
        for tr, _ in saved:
            tr.forward = torch.compile(tr.forward, fullgraph=fullgraph)
        yield
    finally:
        for tr, own in saved:
            if own is None:
                vars(tr).pop("forward", None)
            else:
                tr.forward = own

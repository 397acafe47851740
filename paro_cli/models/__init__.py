"""Model adapters: what paro needs to know about one transformer family (the contract:
base.TransformerAdapter), and the registry from a diffusers transformer class name to its
adapter.

An adapter tells where self-attention happens (processor keys), the call site to intercept
(the module-level name its processors call attention through: `dispatch_attention_fn`, or
CogVideoX's `F.scaled_dot_product_attention`), how to read the token grid and the timestep
from a forward call, and where text tokens sit in the self-attention sequence.
"""

from __future__ import annotations

import hashlib
import json

import torch

from ..errors import ModelError
from .base import TransformerAdapter
from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .hunyuanvideo import HunyuanVideoAdapter
from .wan import WanAdapter

ADAPTERS = {
    adapter.transformer_class: adapter
    for adapter in (WanAdapter(), CogVideoXAdapter(), HunyuanVideoAdapter(), FluxAdapter())
}


def adapter_for(transformer: torch.nn.Module) -> TransformerAdapter:
    name = type(transformer).__name__
    if name not in ADAPTERS:
        raise ModelError(f"unsupported transformer {name}", "supported: " + ", ".join(sorted(ADAPTERS)))
    return ADAPTERS[name]


def config_fingerprint(transformer: torch.nn.Module) -> str:
    """Short hash of the transformer's public config: equal configs give equal fingerprints."""
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

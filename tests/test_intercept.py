"""Interception (paro_cli/intercept.py): routing a transformer's self-attention calls to a handler
is transparent and reversible."""

import torch

from paro_cli.intercept import AttentionInterceptor
from paro_cli.models import adapter_for

from conftest import Recorder, run_tiny_wan, tiny_wan


def test_interception_is_transparent_and_reversible():
    model = tiny_wan()
    x = torch.randn(2, 4, 3, 8, 10)
    stock = run_tiny_wan(model, x)
    processors = dict(model.attn_processors)
    from diffusers.models.transformers import transformer_wan

    original = transformer_wan.dispatch_attention_fn
    rec = Recorder()
    with AttentionInterceptor(model, adapter_for(model), rec):
        assert torch.equal(run_tiny_wan(model, x), stock)
    assert rec.forwards == [((3, 4, 5), 0, 0.7)]
    assert rec.calls == [(0, (2, 60, 2, 12)), (1, (2, 60, 2, 12))]  # attn1 only; attn2 untouched
    assert transformer_wan.dispatch_attention_fn is original
    assert all(model.attn_processors[k] is p for k, p in processors.items())

"""Applying a plan (paro_cli/plan_attention.py): density 1 is exact, each layer's orders and each
slot's masks reach the backend, plans for another model or geometry are refused."""

import pytest
import torch

from paro_cli.api import apply
from paro_cli.backends import select_backend
from paro_cli.intercept import AttentionInterceptor
from paro_cli.models import adapter_for
from paro_cli.models.loading import load_model
from paro_cli.plan import pack_bits
from paro_cli.plan_attention import PlanAttention

from conftest import full_plan, rel_l2, run_tiny_wan, tiny_wan


@pytest.mark.parametrize("orders", [[["FHW", "FHW"], ["FHW", "FHW"]], [["HWF", "WFH"], ["FWH", "WHF"]]])
def test_density_one_plan_equals_stock_model(orders):
    model = tiny_wan()
    x = torch.randn(2, 4, 3, 8, 10)
    stock = run_tiny_wan(model, x)
    plan = full_plan(model, (3, 4, 5), orders)
    backend = select_backend("torch", torch.device("cpu"), torch.float32, 12, 16, "fp32", "fp32")
    handler = PlanAttention(plan, "transformer", backend, torch.device("cpu"), "fp32", "fp32")
    with AttentionInterceptor(model, adapter_for(model), handler):
        out = run_tiny_wan(model, x)
    assert handler.calls["paro"] == 2
    assert rel_l2(out, stock) <= 1e-5


def test_apply_refuses_other_geometry_and_model(planted_model, planted_calibration):
    _, plan = planted_calibration
    from paro_cli.errors import PlanError

    with pytest.raises(PlanError, match="token grid"):
        with apply(planted_model, plan, backend="auto", grid=(4, 16, 16)):
            pass
    other = load_model("embedded")
    other.transformer.register_to_config(num_layers=3)  # a different config, same class
    with pytest.raises(PlanError, match="another transformer config"):
        with apply(other, plan, backend="auto", grid=plan.grid):
            pass


def test_plan_wiring_uses_each_layers_order_and_each_slots_mask():
    """Sparse random masks, different per slot and layer: every call must equal the reference
    computed with that layer's orders and that timestep slot's mask."""
    from paro_kernels.reference import paro_attention_reference

    model = tiny_wan()
    grid = (3, 4, 5)
    plan = full_plan(model, grid, [["HWF", "WFH"], ["FWH", "WHF"]])
    nb = plan.num_blocks
    g = torch.Generator().manual_seed(5)
    kept = (torch.rand(2, 2, 2, nb, nb, generator=g) < 0.5) | torch.eye(nb, dtype=torch.bool)
    plan.components["transformer"].packed_masks = pack_bits(kept)
    backend = select_backend("torch", torch.device("cpu"), torch.float32, 12, 16, "fp32", "fp32")

    class Recording(PlanAttention):
        def attention(self, layer, q, k, v, dense, layout):
            out = super().attention(layer, q, k, v, dense, layout)
            self.seen.append((self.slot, layer, q, k, v, out))
            return out

    handler = Recording(plan, "transformer", backend, torch.device("cpu"), "fp32", "fp32")
    handler.seen = []
    x = torch.randn(2, 4, 3, 8, 10)
    with AttentionInterceptor(model, adapter_for(model), handler), torch.no_grad():
        for t in (900.0, 100.0):  # slot 0 (t > 0.5), slot 1
            model(
                hidden_states=x,
                timestep=torch.tensor([t, t]),
                encoder_hidden_states=torch.zeros(2, 5, 16),
                return_dict=False,
            )
    assert [(slot, layer) for slot, layer, *_ in handler.seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    orders = plan.components["transformer"].orders
    from paro_kernels.orders import head_permutations

    for slot, layer, q, k, v, out in handler.seen:
        expect = paro_attention_reference(
            q, k, v, perm=head_permutations(orders[layer], grid), kept=kept[slot, layer], block=16
        )
        assert rel_l2(out, expect) <= 1e-5
        other = paro_attention_reference(
            q, k, v, perm=head_permutations(orders[layer], grid), kept=kept[1 - slot, 1 - layer], block=16
        )
        assert rel_l2(out, other) > 1e-3  # the masks differ enough for a wiring mistake to show

"""torch.compile(fullgraph=True) of a Wan transformer with the paro Triton backend (GPU only)."""

import pytest
import torch

from conftest import rel_l2


@pytest.mark.gpu
def test_compiled_transformer_with_paro_backend_matches_eager():
    from test_models import TINY_WAN, full_plan, model_adapter

    from kernels.layout import num_blocks
    from paro_cli.backend import use_plan
    from paro_cli.models.loading import LoadedModel
    from paro_cli.plan import pack_bits
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**TINY_WAN, "attention_head_dim": 16}).cuda().to(torch.bfloat16).eval()
    grid = (3, 8, 10)
    plan = full_plan(model, grid, [["HWF", "WFH"], ["FWH", "WHF"]], qk="int8", pv="fp8", block=32)
    nb = num_blocks(240, 32)
    kept = (torch.rand(2, 2, 2, nb, nb) < 0.4) | torch.eye(nb, dtype=torch.bool)
    plan.components["transformer"].packed_masks = pack_bits(kept)
    loaded = LoadedModel("tiny", model, model_adapter(model), torch.device("cuda"), torch.bfloat16)
    x = torch.randn(2, 4, 3, 16, 20, device="cuda", dtype=torch.bfloat16)
    context = torch.randn(2, 5, 16, device="cuda", dtype=torch.bfloat16)

    def step(t):
        with torch.no_grad():
            return model(hidden_states=x, timestep=torch.tensor([t, t], device="cuda"), encoder_hidden_states=context, return_dict=False)[0]

    with use_plan(loaded, plan, grid, "triton") as handler:
        eager = [step(900.0), step(100.0)]  # two timestep slots
        model.forward = torch.compile(model.forward, fullgraph=True)  # hooks stay outside the graph
        compiled = [step(900.0), step(100.0), step(900.0)]
        assert handler.paro_calls == 10
    for a, b in zip(compiled, eager + eager[:1]):
        assert rel_l2(a, b) <= 1e-2
    assert rel_l2(eager[0], eager[1]) > 1e-3  # the slots really differ

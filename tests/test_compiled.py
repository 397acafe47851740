"""The paro Triton backend under torch.compile(fullgraph=True) and CUDA graphs (GPU only)."""

import pytest
import torch

from conftest import rel_l2


def tiny_wan_with_plan():
    """A tiny bf16 Wan transformer on the GPU, a plan with two timestep slots whose masks differ,
    and one denoising step as a function of the timestep."""
    from diffusers import WanTransformer3DModel

    from paro_cli.models import adapter_for
    from paro_cli.models.loaded import LoadedModel
    from paro_cli.plan import pack_bits
    from paro_kernels.layout import num_blocks

    from conftest import TINY_WAN, full_plan

    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**TINY_WAN, "attention_head_dim": 16}).cuda().to(torch.bfloat16).eval()
    grid = (3, 8, 10)
    plan = full_plan(model, grid, [["HWF", "WFH"], ["FWH", "WHF"]], qk="int8", pv="fp8", block=32)
    nb = num_blocks(240, 32)
    kept = (torch.rand(2, 2, 2, nb, nb) < 0.4) | torch.eye(nb, dtype=torch.bool)
    plan.components["transformer"].packed_masks = pack_bits(kept)
    loaded = LoadedModel("tiny", model, adapter_for(model), torch.device("cuda"), torch.bfloat16)
    x = torch.randn(2, 4, 3, 16, 20, device="cuda", dtype=torch.bfloat16)
    context = torch.randn(2, 5, 16, device="cuda", dtype=torch.bfloat16)

    def step(t):
        with torch.no_grad():
            return model(
                hidden_states=x,
                timestep=torch.tensor([t, t], device="cuda"),
                encoder_hidden_states=context,
                return_dict=False,
            )[0]

    return model, loaded, plan, grid, step


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_transformer_with_paro_backend_matches_eager(mode):
    """fullgraph=True compiles without a graph break; "reduce-overhead" also replays the step
    as a CUDA graph, which must see the masks of the current slot (refilled in place)."""
    from paro_cli.api import apply

    model, loaded, plan, grid, step = tiny_wan_with_plan()
    with apply(loaded, plan, backend="triton", grid=grid) as run:
        eager = [step(900.0), step(100.0)]  # two timestep slots
        model.forward = torch.compile(model.forward, fullgraph=True, mode=mode)  # hooks stay outside the graph
        # (CUDA graph outputs are overwritten by the next replay: keep copies.) The third step
        # replays a graph recorded on the other slot's masks; no step after the first compiles
        # again (a Python counter bumped inside the graph once recompiled every call).
        compiled = [step(900.0).clone()]
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled += [step(t).clone() for t in (100.0, 900.0, 100.0, 900.0)]
        assert run.calls == {"paro": 14}
    for a, b in zip(compiled, eager * 3):
        assert rel_l2(a, b) <= 1e-2
    assert rel_l2(eager[0], eager[1]) > 1e-3  # the slots really differ


@pytest.mark.gpu
@pytest.mark.parametrize("block,dim", [(64, 64), (128, 128)])  # on an H100: the portable kernel, the Hopper kernel
def test_attention_op_is_captured_by_cuda_graphs_and_never_syncs_the_host(block, dim):
    """One paro attention call issues no host synchronisation, and a captured CUDA graph of it,
    replayed after new inputs and a new mask are copied into the captured tensors, equals an
    eager call on them."""
    import paro_kernels.ops  # noqa: F401  (registers torch.ops.paro.attention)
    from paro_kernels.layout import kept_block_lists

    from conftest import attention_case

    first, second = (
        attention_case((4, 8, 10), 13, True, heads=3, dim=dim, block=block, batch=2, density=d, seed=s, device="cuda")
        for d, s in ((0.3, 0), (0.6, 1))
    )
    inputs = {name: first[name].clone() for name in ("q", "k", "v")}
    index, count = kept_block_lists(first["kept"])

    def attend(q, k, v, index, count):
        return torch.ops.paro.attention(q, k, v, first["perm"], index, count, block, 13, True, "int8", "fp8", dim**-0.5)

    def call():
        return attend(inputs["q"], inputs["k"], inputs["v"], index, count)

    call()  # compile the kernels outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    for name in inputs:
        inputs[name].copy_(second[name])
    new_index, new_count = kept_block_lists(second["kept"])
    index.copy_(new_index)
    count.copy_(new_count)
    graph.replay()
    assert rel_l2(captured, call()) <= 1e-6
    assert (
        rel_l2(captured, attend(first["q"], first["k"], first["v"], *kept_block_lists(first["kept"]))) > 1e-2
    )  # it did change


@pytest.mark.gpu
def test_compiled_cogvideox_with_paro_backend_matches_eager():
    """CogVideoX reaches attention through F.scaled_dot_product_attention in diffusers' legacy
    processor, which paro rebinds: the compiled step (fullgraph) must still run the plan."""
    from paro_cli.api import apply
    from paro_cli.calibration import calibrate
    from paro_cli.models import adapter_for
    from paro_cli.models.loaded import LoadedModel
    from paro_cli.models.planted import build_planted_cogvideox
    from paro_cli.recipe import load_recipe

    model = build_planted_cogvideox().cuda().to(torch.bfloat16)
    adapter = adapter_for(model)
    loaded = LoadedModel(
        "planted-cogvideox", model, adapter, torch.device("cuda"), torch.bfloat16, None, adapter.prompt_encoder(model)
    )
    recipe = load_recipe(
        "planted",
        {
            "sampling.steps": 2,
            "geometry.frames": 4,
            "geometry.height": 16,
            "geometry.width": 16,
            "sparsity.block_size": 32,
            "sparsity.density": 0.5,
            "precision.qk": "int8",
            "precision.pv": "fp8",
        },
    )
    plan = calibrate(loaded, recipe)
    x = torch.randn(2, 4, 4, 16, 16, device="cuda", dtype=torch.bfloat16)
    context = torch.randn(2, 8, 16, device="cuda", dtype=torch.bfloat16)

    def step(t):
        with torch.no_grad():
            return model(
                **adapter.forward_inputs(model, x, torch.tensor(t, device="cuda"), context, plan.grid, 1.0),
                return_dict=False,
            )[0]

    dense = step(900)
    with apply(loaded, plan, backend="triton", grid=plan.grid) as run:
        eager = step(900)
        model.forward = torch.compile(model.forward, fullgraph=True)
        compiled = step(900)
        assert run.calls == {"paro": 4}
    assert rel_l2(compiled, eager) <= 1e-2
    assert rel_l2(eager, dense) > 1e-3  # the plan really ran (density 0.5, 8-bit)

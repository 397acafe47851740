"""Every supported model family on CPU, with small planted transformers built from config: the
paro backend at density 1 without quantisation reproduces the stock model, calibration finds
the planted orders, and a plan made for one family or geometry is refused by another."""

import pytest
import torch

from paro_cli.api import apply
from paro_cli.calibration import calibrate
from paro_cli.errors import PlanError
from paro_cli.intercept import AttentionInterceptor
from paro_cli.models import ADAPTERS, adapter_for
from paro_cli.models.loaded import LoadedModel
from paro_cli.models.planted import (
    PLANTED_BUILDERS,
    PLANTED_FLUX_ORDERS,
    PLANTED_ORDERS,
    build_planted_cogvideox,
    build_planted_flux,
    build_planted_hunyuanvideo,
)
from paro_cli.recipe import load_recipe
from paro_cli.runner import sample

from conftest import Recorder, rel_l2

# The transformer's input (bare transformers: no VAE): 256 tokens, a 4x8x8 grid for the video
# families, a 16x16 image for Flux (latent positions packed 2x2).
VIDEO = {"geometry.frames": 4, "geometry.height": 16, "geometry.width": 16}
IMAGE = {"geometry.frames": 1, "geometry.height": 32, "geometry.width": 32}
GRID = {"wan": (4, 8, 8), "cogvideox": (4, 8, 8), "flux": (1, 16, 16), "hunyuanvideo": (4, 8, 8)}
# text tokens in self-attention (paro's prompt encoder pads to 24; CogVideoX's to 8 here)
TEXT = {"wan": (0, "none"), "cogvideox": (8, "prefix"), "flux": (24, "prefix"), "hunyuanvideo": (24, "suffix")}
IMAGE_ORDERS = [[o.replace("F", "") for o in layer] for layer in PLANTED_FLUX_ORDERS]  # F has size 1 in an image
ORDERS = {
    "wan": [list(o) for o in PLANTED_ORDERS],
    "cogvideox": [list(o) for o in PLANTED_ORDERS],
    "flux": IMAGE_ORDERS,
    "hunyuanvideo": [list(o) for o in PLANTED_ORDERS],
}


def small(family, **overrides):
    """The planted recipe on the small input of `family`, 4 steps, 16-token blocks."""
    return load_recipe(
        "planted",
        {"sampling.steps": 4, "sparsity.block_size": 16, **(IMAGE if family == "flux" else VIDEO), **overrides},
    )


def test_every_registered_family_is_tested_here():
    assert sorted(a.family for a in ADAPTERS.values()) == sorted(PLANTED_BUILDERS)


@pytest.fixture(scope="module", params=sorted(PLANTED_BUILDERS))
def planted(request):
    model = PLANTED_BUILDERS[request.param]()
    adapter = adapter_for(model)
    return LoadedModel(
        f"planted-{request.param}",
        model,
        adapter,
        torch.device("cpu"),
        torch.float32,
        None,
        adapter.prompt_encoder(model),
    )


def test_interception_is_transparent_and_reversible(planted):
    recipe = small(planted.family, **{"sampling.steps": 2})
    stock = sample(planted, recipe, ["a red circle"], [0], decode=False)
    recorder = Recorder()
    with AttentionInterceptor(planted.transformer, planted.adapter, recorder):
        seen = sample(planted, recipe, ["a red circle"], [0], decode=False)
    padded = planted.family == "hunyuanvideo"  # its 21 padding tokens leave the calls: float rounding moves
    assert rel_l2(seen, stock) <= 1e-6 if padded else torch.equal(seen, stock)
    assert torch.equal(sample(planted, recipe, ["a red circle"], [0], decode=False), stock)
    text = TEXT[planted.family][0]
    assert {f[:2] for f in recorder.forwards} == {(GRID[planted.family], text)}
    assert len({round(f[2], 3) for f in recorder.forwards}) == 2  # one normalised timestep per step
    assert [c[0] for c in recorder.calls] == [0, 1] * 2  # both self-attention layers, each step
    batch = 2 if planted.adapter.classifier_free_guidance else 1  # Flux and HunyuanVideo: guidance-distilled
    seen_text = 3 if padded else text  # "a red circle": the handler sees the real tokens only
    assert {c[1] for c in recorder.calls} == {
        (batch, 256 + seen_text, 2, planted.adapter.head_dim(planted.transformer))
    }


def test_density_one_plan_equals_stock_model(planted):
    """Calibrated at density 1 in fp32: arrival order, every block kept; the torch backend then
    computes what the stock attention does."""
    recipe = small(planted.family, **{"sparsity.density": 1.0})
    plan = calibrate(planted, recipe)
    assert plan.family == planted.family and plan.components["transformer"].achieved_density.min() == 1.0
    prompts = ["a blue square", "a green triangle moving left on a plain background"]  # texts of two lengths
    stock = sample(planted, recipe, prompts, [1, 2], decode=False)
    with apply(planted, plan, backend="torch", grid=plan.grid) as run:
        out = sample(planted, recipe, prompts, [1, 2], decode=False)
    assert run.calls == {"paro": 4 * 2}  # every step and layer through the plan
    assert rel_l2(out, stock) <= 1e-5


def test_planted_orders_are_found(planted):
    recipe = small(planted.family)
    plan = calibrate(planted, recipe)
    assert plan.components["transformer"].orders == ORDERS[planted.family]
    assert (plan.text_tokens, plan.text_position) == TEXT[planted.family]
    stock = sample(planted, recipe, ["a red circle"], [0], decode=False)
    with apply(planted, plan, backend="torch", grid=plan.grid):  # the plan at density 0.3 really runs: the output moves
        assert rel_l2(sample(planted, recipe, ["a red circle"], [0], decode=False), stock) > 1e-4


def test_plans_are_refused_by_other_families_and_text_layouts():
    loaded = {}
    for family, build in PLANTED_BUILDERS.items():
        model = build()
        adapter = adapter_for(model)
        loaded[family] = LoadedModel(
            family, model, adapter, torch.device("cpu"), torch.float32, None, adapter.prompt_encoder(model)
        )
    plans = {family: calibrate(m, small(family, **{"sampling.steps": 2})) for family, m in loaded.items()}
    with pytest.raises(PlanError, match="plan is for a wan model, this run uses a cogvideox model"):
        with apply(loaded["cogvideox"], plans["wan"], backend="torch", grid=plans["wan"].grid):
            pass
    with pytest.raises(PlanError, match="plan is for a cogvideox model, this run uses a wan model"):
        with apply(loaded["wan"], plans["cogvideox"], backend="torch", grid=plans["cogvideox"].grid):
            pass
    with pytest.raises(PlanError, match="plan is for a flux model, this run uses a cogvideox model"):
        with apply(loaded["cogvideox"], plans["flux"], backend="torch", grid=plans["flux"].grid):
            pass
    with pytest.raises(PlanError, match="plan is for a hunyuanvideo model, this run uses a wan model"):
        with apply(loaded["wan"], plans["hunyuanvideo"], backend="torch", grid=plans["hunyuanvideo"].grid):
            pass
    # the same CogVideoX model called with 6 text tokens instead of the plan's 8
    cog = loaded["cogvideox"]
    inputs = cog.adapter.forward_inputs(
        cog.transformer, torch.randn(1, 4, 4, 16, 16), torch.tensor(500), torch.randn(1, 6, 16), (4, 8, 8), 1.0
    )
    with pytest.raises(
        PlanError, match=r"plan has 8 text tokens \(prefix\) in self-attention, this run has 6 \(prefix\)"
    ):
        with apply(cog, plans["cogvideox"], backend="torch", grid=plans["cogvideox"].grid), torch.no_grad():
            cog.transformer(**inputs)


@pytest.mark.parametrize(
    "recipe,grid",
    [
        ("wan2.1-t2v-1.3b", (21, 30, 52)),
        ("wan2.1-t2v-14b", (21, 45, 80)),
        ("wan2.2-t2v-a14b", (21, 45, 80)),
        ("cogvideox-5b", (13, 30, 45)),
        ("cogvideox-2b", (13, 30, 45)),
        ("flux.1-dev", (1, 64, 64)),
        ("flux.1-schnell", (1, 64, 64)),
        ("hunyuanvideo", (33, 45, 80)),
    ],
)
def test_family_recipes_give_the_model_cards_token_grids(recipe, grid):
    """The shipped recipes' geometry through each family's pipeline rules (VAE factors 4 and 8,
    as the real pipelines have; a stand-in pipeline, since the real one needs transformers)."""
    import inspect
    from types import SimpleNamespace

    from diffusers import (
        CogVideoXTransformer3DModel,
        FluxTransformer2DModel,
        HunyuanVideoTransformer3DModel,
        WanTransformer3DModel,
    )

    r = load_recipe(recipe)
    cls = {
        "wan": WanTransformer3DModel,
        "cog": CogVideoXTransformer3DModel,
        "flu": FluxTransformer2DModel,
        "hun": HunyuanVideoTransformer3DModel,
    }[recipe[:3]]
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty}
    transformer = SimpleNamespace(config=SimpleNamespace(**defaults))  # the full-size config, no weights
    pipeline = SimpleNamespace(
        vae_scale_factor_temporal=4, vae_scale_factor_spatial=8, vae_scale_factor=8, transformer=transformer
    )
    assert ADAPTERS[cls.__name__].pipeline_token_grid(pipeline, r.geometry) == grid


def test_transformer_folders_of_every_family_load_strictly(tmp_path):
    from paro_cli.models.loading import load_model

    for family, build in PLANTED_BUILDERS.items():
        build().save_pretrained(tmp_path / family)
        loaded = load_model(str(tmp_path / family), device=torch.device("cpu"))
        assert loaded.family == family and loaded.prompt_encoder is not None


def test_pipeline_geometry_must_fit_the_vae_and_patch():
    from types import SimpleNamespace

    from paro_cli.errors import RecipeError
    from paro_cli.recipe import Geometry

    pipeline = SimpleNamespace(
        vae_scale_factor_temporal=4,
        vae_scale_factor_spatial=8,
        vae_scale_factor=8,
        transformer=SimpleNamespace(config=SimpleNamespace(in_channels=16, patch_size_t=None, patch_size=(1, 2, 2))),
    )
    for adapter in ADAPTERS.values():
        frames = 1 if adapter.family == "flux" else 49
        with pytest.raises(RecipeError, match=r"geometry.height = 484: [\w.]+ pipelines need multiples of 16"):
            adapter.pipeline_token_grid(pipeline, Geometry(frames=frames, height=484, width=720))
    with pytest.raises(RecipeError, match="geometry.frames = 49: FLUX.1 makes images"):
        ADAPTERS["FluxTransformer2DModel"].pipeline_token_grid(pipeline, Geometry(frames=49, height=1024, width=1024))


@pytest.mark.parametrize(
    "name,layers,heads,head_dim",
    [
        ("wan2.1-t2v-1.3b", 30, 12, 128),
        ("wan2.1-t2v-14b", 40, 40, 128),
        ("cogvideox-5b", 42, 48, 64),
        ("cogvideox-2b", 30, 30, 64),
        ("flux.1-dev", 57, 24, 128),
        ("flux.1-schnell", 57, 24, 128),
        ("hunyuanvideo", 60, 24, 128),
    ],
)
def test_full_size_architectures_have_the_published_shapes(name, layers, heads, head_dim):
    """Built on the meta device (no memory): what `paro bench e2e --architecture` times."""
    from paro_cli.models.architectures import build_architecture

    loaded = build_architecture(name, torch.device("meta"))
    tr, adapter = loaded.transformer, loaded.adapter
    assert (len(adapter.attention_layers(tr)), adapter.num_heads(tr), adapter.head_dim(tr)) == (layers, heads, head_dim)
    assert next(tr.parameters()).dtype == torch.bfloat16
    load_recipe(name)  # the geometry it runs at


def test_cli_calibrates_a_transformer_folder_of_another_family_and_refuses_its_plan_elsewhere(capsys, tmp_path):
    """`paro calibrate` on a saved CogVideoX transformer; that plan given to a Flux transformer
    is refused by `bench e2e` before any sampling (exit 2, one line naming both families)."""
    import json

    from conftest import paro

    build_planted_cogvideox().save_pretrained(tmp_path / "cog")
    build_planted_flux().save_pretrained(tmp_path / "flux")
    plan = tmp_path / "cog.plan.safetensors"
    code, out, _ = paro(
        capsys,
        "calibrate",
        "--recipe",
        "planted",
        "--model",
        tmp_path / "cog",
        "--frames",
        4,
        "--height",
        16,
        "--width",
        16,
        "--steps",
        3,
        "--block-size",
        16,
        "--out",
        plan,
        "--json",
    )
    assert code == 0 and (json.loads(out)["family"], json.loads(out)["text_tokens"]) == ("cogvideox", 8)
    code, out, err = paro(
        capsys,
        "bench",
        "e2e",
        "--recipe",
        "planted",
        "--model",
        tmp_path / "flux",
        "--frames",
        1,
        "--height",
        32,
        "--width",
        32,
        "--steps",
        3,
        "--plan",
        plan,
    )
    assert code == 2 and "plan is for a cogvideox model, this run uses a flux model" in err and "dense" not in out + err


def test_padded_text_rows_attend_as_in_the_stock_model():
    """HunyuanVideo masks padded text out of attention's keys; paro drops it from each batch
    element's call and gives the padding's own query rows the stock result (attention over the
    real keys). The double-stream block's text output, padding rows included, is the stock one."""
    model = build_planted_hunyuanvideo()
    adapter = adapter_for(model)
    encoder = adapter.prompt_encoder(model)
    context = encoder(["a red circle", "a blue square moving up on a striped background"])
    inputs = adapter.forward_inputs(model, torch.randn(2, 4, 4, 16, 16), torch.tensor(700.0), context, (4, 8, 8), 6.0)
    outputs = []
    hook = model.transformer_blocks[0].register_forward_hook(lambda module, args, out: outputs.append(out[1]))
    try:
        with torch.no_grad():
            model(**inputs)
            with AttentionInterceptor(model, adapter, Recorder()):
                model(**inputs)
    finally:
        hook.remove()
    stock, seen = outputs
    assert inputs["encoder_attention_mask"].sum(1).tolist() == [3, 9]  # 21 and 15 padding tokens
    assert rel_l2(seen, stock) <= 1e-5


def test_pipeline_masks_in_the_model_dtype_are_counted_as_integers():
    """HunyuanVideo pipelines pass the text mask in the transformer's dtype."""
    model = build_planted_hunyuanvideo()
    adapter = adapter_for(model)
    context = adapter.prompt_encoder(model)(["a red circle", "a blue square moving up"])
    inputs = adapter.forward_inputs(model, torch.randn(2, 4, 4, 16, 16), torch.tensor(700.0), context, (4, 8, 8), 6.0)
    with torch.no_grad():
        stock = model(**inputs, return_dict=False)[0]
        with AttentionInterceptor(model, adapter, Recorder()):
            seen = model(
                **{**inputs, "encoder_attention_mask": inputs["encoder_attention_mask"].float()}, return_dict=False
            )[0]
    assert adapter.valid_text_lengths((), {"encoder_attention_mask": inputs["encoder_attention_mask"].bfloat16()}) == [
        3,
        5,
    ]
    assert rel_l2(seen, stock) <= 1e-6


def test_flux_calls_with_more_image_tokens_than_the_grid_are_refused():
    from paro_cli.errors import ModelError

    adapter = ADAPTERS["FluxTransformer2DModel"]
    ids = torch.zeros(16, 16, 3)
    ids[..., 1], ids[..., 2] = torch.arange(16)[:, None], torch.arange(16)[None, :]
    kwargs = {
        "hidden_states": torch.zeros(1, 512, 16),
        "img_ids": ids.reshape(-1, 3),
    }  # a reference image's tokens appended
    with pytest.raises(ModelError, match="512 image tokens on a 16x16 grid"):
        adapter.token_grid(None, (), kwargs)
    assert adapter.token_grid(None, (), {**kwargs, "hidden_states": torch.zeros(1, 256, 16)}) == (1, 16, 16)


@pytest.mark.parametrize("rope,shift", [(True, 1.0), (False, 3.0)])
def test_cogvideox_bare_loop_schedules_as_the_shipped_pipelines(rope, shift):
    """paro's own loop for a bare CogVideoX transformer uses the scheduler the hub pipelines
    ship (CogVideoX-5B and 1.5 with RoPE: SNR shift 1; 2B without: 3), so a calibration there
    sees the pipelines' noise levels."""
    from diffusers import CogVideoXTransformer3DModel

    from paro_cli.models.planted import PLANTED_COGVIDEOX_CONFIG

    model = CogVideoXTransformer3DModel(**{**PLANTED_COGVIDEOX_CONFIG, "use_rotary_positional_embeddings": rope})
    config = adapter_for(model).scheduler(model, load_recipe("planted").sampling).config
    shipped = {
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True,
        "snr_shift_scale": shift,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "set_alpha_to_one": True,
        "clip_sample": False,
        "steps_offset": 0,
    }
    assert {key: config[key] for key in shipped} == shipped

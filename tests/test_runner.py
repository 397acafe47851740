"""Sampling (paro_cli/runner.py): pipelines run with the recipe's scheduler settings."""


def test_pipelines_get_the_recipes_flow_shift_where_their_scheduler_has_a_fixed_one():
    from diffusers import CogVideoXDDIMScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from paro_cli.runner import with_flow_shift

    wan = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    assert with_flow_shift(wan, 5.0).config.flow_shift == 5.0 and wan.config.flow_shift == 3.0
    hunyuan = FlowMatchEulerDiscreteScheduler(shift=7.0)
    assert with_flow_shift(hunyuan, 5.0).config.shift == 5.0
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)  # shifts by resolution
    assert with_flow_shift(flux, 5.0) is flux
    cogvideox = CogVideoXDDIMScheduler()
    assert with_flow_shift(cogvideox, 5.0) is cogvideox

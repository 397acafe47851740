"""paro's Python API: PAROAttention on a diffusers pipeline held in your own code.

    import paro

    plan = paro.calibrate(pipe, ["a cat surfing a wave"], density=0.2, qk="int8", pv="fp8",
                          num_frames=81, height=480, width=832, num_inference_steps=50)
    plan.save("wan.plan.safetensors")
    plan = paro.load_plan("wan.plan.safetensors")
    with paro.apply(pipe, plan):  # or: handle = paro.apply(pipe, plan); ...; handle.remove()
        video = pipe(prompt="a cat surfing a wave", num_frames=81, height=480, width=832).frames[0]

The implementation is paro_cli.api, which the `paro` command runs on too.
"""

from paro_cli import __version__
from paro_cli.api import apply, calibrate
from paro_cli.calibration import CalibrationProgress
from paro_cli.errors import BackendError, ModelError, ParoError, PlanError, RecipeError
from paro_cli.plan import Plan, load_plan
from paro_cli.plan_attention import AppliedPlan
from paro_cli.recipe import Recipe, load_recipe

__all__ = [
    "AppliedPlan",
    "BackendError",
    "CalibrationProgress",
    "ModelError",
    "ParoError",
    "Plan",
    "PlanError",
    "Recipe",
    "RecipeError",
    "__version__",
    "apply",
    "calibrate",
    "load_plan",
    "load_recipe",
]

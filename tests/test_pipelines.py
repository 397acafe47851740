"""Real diffusers pipelines (tiny, random weights, built and saved here) through the `paro`
command in a subprocess, loaded from their folders with --model as a user's would be.

Per pipeline: paro's dense output equals plain diffusers' for the same arguments; calibrate ->
plan show --json -> generate with the plan, whose effect shows; bench e2e; a plan for another
family or transformer config, and the pipeline's own plan at another geometry, are refused (exit
2, one line, nothing written). The commands alternate between the repository root (where the
working directory is first on sys.path) and a folder outside it, the other way round for every
other pipeline, so each command and each pipeline runs from both.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the pipelines extra")
from tiny_pipelines import CALL_ARGS, KINDS, example_image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a cat surfing a wave"
FAMILIES = {
    "wan": "wan",
    "wan22": "wan",
    "wan_i2v": "wan",
    "cogvideox": "cogvideox",
    "hunyuanvideo": "hunyuanvideo",
    "flux": "flux",
}
GRIDS = {kind: [1, 6, 8] if kind == "flux" else [3, 4, 6] for kind in KINDS}


def paro(cwd: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "paro_cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def refused(done: subprocess.CompletedProcess, match: str) -> None:
    """Exit 2 with one line on stderr naming the problem."""
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], done.stderr


def write_recipe(kind: str, folder: Path, path: Path) -> Path:
    args = CALL_ARGS[kind]
    sampling = {"steps": 2, "guidance": 3.5 if kind == "flux" else 5.0}
    if "max_sequence_length" in args:
        sampling["max_sequence_length"] = args["max_sequence_length"]
    recipe = {
        "model": str(folder),
        "geometry": {"frames": args.get("num_frames", 1), "height": args["height"], "width": args["width"]},
        "sampling": sampling,
        "calibration": {"prompts": [PROMPT, "a dog running on a beach"], "seeds": [0]},
        "sparsity": {"density": 0.3, "block_size": 16},
        "precision": {"qk": "fp32", "pv": "fp32"},
    }
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def diffusers_frames(kind: str, folder: Path, image_path: Path | None) -> np.ndarray:
    """Plain diffusers' output for paro's dense run, laid out as paro's PNG (frames side by side)."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    args = {k: v for k, v in CALL_ARGS[kind].items() if k != "prompt_template"}  # the CLI runs the default template
    if kind != "flux":
        args["negative_prompt"] = ""
    if image_path is not None:
        args["image"] = Image.open(image_path).convert("RGB")
    out = pipe(
        prompt=PROMPT,
        num_inference_steps=2,
        generator=[torch.Generator("cpu").manual_seed(0)],
        output_type="np",
        guidance_scale=3.5 if kind == "flux" else 5.0,
        **args,
    )
    frames = out.images[:, None] if kind == "flux" else out.frames
    return np.concatenate(list((frames[0] * 255).round().astype(np.uint8)), axis=1)


@pytest.fixture(scope="module")
def foreign_plan(tmp_path_factory, planted_calibration) -> Path:
    """A plan of the planted Wan transformer: another family, or another Wan config."""
    path = tmp_path_factory.mktemp("foreign") / "planted.safetensors"
    planted_calibration[1].save(path)
    return path


@pytest.mark.parametrize("kind", list(KINDS))
def test_pipeline_through_the_cli(kind, tmp_path_factory, tiny_pipeline, foreign_plan):
    work = tmp_path_factory.mktemp(kind)
    folder = tiny_pipeline(kind)
    recipe = write_recipe(kind, folder, work / "recipe.yaml")
    image = example_image(kind)
    image_args = []
    if image is not None:
        image.save(work / "image.png")
        image_args = ["--image", work / "image.png"]
    outside = tmp_path_factory.mktemp("elsewhere")
    first, second = (outside, REPO) if list(KINDS).index(kind) % 2 == 0 else (REPO, outside)
    plan = work / "plan.safetensors"
    common = ["--recipe", recipe, *image_args]

    ok(paro(first, "generate", *common, "--prompt", PROMPT, "--seed", 0, "--out", work / "dense.png"))
    dense = iio.imread(work / "dense.png")
    assert np.abs(dense.astype(int) - diffusers_frames(kind, folder, work / "image.png" if image else None)).max() <= 1

    calibrated = json.loads(ok(paro(second, "calibrate", *common, "--out", plan, "--json")).stdout)
    assert calibrated["family"] == FAMILIES[kind] and calibrated["path"] == str(plan)
    shown = json.loads(ok(paro(first, "plan", "show", plan, "--json")).stdout)
    assert shown["grid"] == GRIDS[kind] and shown["density"] == 0.3 and shown["block_size"] == 16
    assert sorted(shown["components"]) == (["transformer", "transformer_2"] if kind == "wan22" else ["transformer"])

    generated = json.loads(
        ok(
            paro(
                second,
                "generate",
                *common,
                "--plan",
                plan,
                "--prompt",
                PROMPT,
                "--seed",
                0,
                "--out",
                work / "paro.png",
                "--json",
            )
        ).stdout
    )
    assert generated["attention_calls"]["paro"] > 0
    planned = iio.imread(work / "paro.png")
    assert (
        planned.shape == dense.shape and np.abs(planned.astype(int) - dense.astype(int)).mean() > 0.1
    )  # the plan's effect

    bench = json.loads(ok(paro(first, "bench", "e2e", *common, "--plan", plan, "--json")).stdout)
    assert bench["speedup"] > 0 and bench["output_rel_l2"] > 0 and bench["attention_calls"]["paro"] > 0

    other = "--height 32" if kind != "flux" else "--height 64"
    refused(
        paro(second, "generate", *common, *other.split(), "--plan", plan, "--out", work / "other-size.png"),
        "token grid",
    )
    refused(
        paro(first, "generate", *common, "--plan", foreign_plan, "--out", work / "foreign.png"),
        "another transformer config" if kind.startswith("wan") else "plan is for a wan model",
    )
    if image is None:  # --image on a text-to-video pipeline: refused before any work
        work_image = work / "not-for-this.png"
        example_image("wan_i2v").save(work_image)
        refused(
            paro(first, "generate", "--recipe", recipe, "--image", work_image, "--out", work / "i.png"),
            "takes no 'image'",
        )
        work_image.unlink()
    assert sorted(p.name for p in work.iterdir()) == sorted(
        ["recipe.yaml", "dense.png", "plan.safetensors", "paro.png", *(["image.png"] if image else [])]
    )

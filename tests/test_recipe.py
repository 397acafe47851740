import pytest

from paro_cli.errors import RecipeError
from paro_cli.recipe import load_recipe, shipped_recipes


def test_shipped_recipes_are_valid():
    names = {p.stem for p in shipped_recipes()}
    assert {"tiny", "tiny-d50-int8-fp8", "tiny-d30-int8-fp8", "tiny-d20-int8-fp8"} <= names
    for path in shipped_recipes():
        load_recipe(str(path))
    preset = load_recipe("tiny-d20-int8-fp8")
    assert (preset.sparsity.density, preset.precision.qk, preset.precision.pv) == (0.2, "int8", "fp8")
    assert preset.quantised and not load_recipe("tiny").quantised


def test_overrides_reach_nested_fields():
    r = load_recipe(
        "tiny",
        {
            "geometry.frames": 4,
            "sparsity.density": 0.25,
            "precision.qk": "int8",
            "model": "x/y",
            "sampling.steps": None,
        },
    )
    assert (r.geometry.frames, r.sparsity.density, r.precision.qk, r.model) == (4, 0.25, "int8", "x/y")
    assert r.sampling.steps == load_recipe("tiny").sampling.steps  # None means "not given"


@pytest.mark.parametrize(
    "text,message",
    [
        ("sparsity: {densty: 0.3}", "unknown recipe key 'sparsity.densty'"),
        ("colour: red", "unknown recipe key 'colour'"),
        ("sparsity: {density: 1.5}", "sparsity.density is 1.5"),
        ("sparsity: {block_size: 48}", "one of 16, 32, 64, 128"),
        ("precision: {qk: int3}", "precision.qk is 'int3'"),
        ("sampling: {steps: 0}", "sampling.steps is 0"),
        ("geometry: {frames: eight}", "geometry.frames must be int"),
        ("backend: cuda", "backend is 'cuda'"),
        ("calibration: {prompts: []}", "calibration.prompts"),
        ("geometry: 3", "geometry must be a mapping"),
        ("sparsity: {density: [", "not valid YAML"),
    ],
)
def test_bad_recipes_name_the_field(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_recipe(str(path))


def test_override_fills_an_empty_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("geometry:\n")
    assert load_recipe(str(path), {"geometry.frames": 4}).geometry.frames == 4


def test_bad_override_and_missing_recipe(tmp_path):
    with pytest.raises(RecipeError, match="sparsity.density is 0.0"):
        load_recipe("tiny", {"sparsity.density": 0.0})
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(RecipeError, match="no shipped recipe named 'nope'"):
        load_recipe("nope")

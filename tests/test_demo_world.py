"""The demo world, its fidelity checker and the prompt encoder: known answers from the generator."""

import random

import torch

from paro_cli.demo.fidelity import fidelity, parse_caption, read_video
from paro_cli.demo.world import DIRECTIONS, render, sample_scenes
from paro_cli.models.prompt_encoder import HashPromptEncoder
from paro_cli.runner import pixels_to_video


def videos(seed, count):
    scenes = sample_scenes(seed, count, 8, 32, 32)
    return scenes, pixels_to_video(render(scenes, 8, 32, 32))


def test_scenes_are_reproducible_and_keep_objects_inside_and_apart():
    a, b = sample_scenes(5, 50, 8, 32, 32), sample_scenes(5, 50, 8, 32, 32)
    assert a == b and a != sample_scenes(6, 50, 8, 32, 32)
    assert torch.equal(render(a[:4], 8, 32, 32), render(b[:4], 8, 32, 32))
    for scene in a:
        for o in scene.objects:
            dx, dy = DIRECTIONS[o.direction]
            for t in (0, 7):
                x, y = o.x + dx * o.speed * t, o.y + dy * o.speed * t
                assert o.size - 1e-6 <= x <= 32 - o.size + 1e-6 and o.size - 1e-6 <= y <= 32 - o.size + 1e-6
        assert len({o.colour for o in scene.objects}) == len(scene.objects)
        assert parse_caption(scene.caption)[1] == scene.background


def test_checker_reads_ground_truth_videos():
    scenes, vids = videos(123, 200)
    scores = [fidelity(v, s.caption) for s, v in zip(scenes, vids)]
    assert sum(scores) / len(scores) >= 0.95
    reading = read_video(vids[0])
    assert set(reading.objects) == {o.colour for o in scenes[0].objects}


def test_checker_is_not_fooled():
    scenes, vids = videos(7, 100)
    captions = [s.caption for s in scenes]
    random.Random(0).shuffle(captions)
    assert sum(fidelity(v, c) for v, c in zip(vids, captions)) / len(vids) < 0.35
    noise = torch.randint(0, 256, vids.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert sum(fidelity(v, s.caption) for v, s in zip(noise, scenes)) / len(vids) < 0.15
    grey = torch.full_like(vids[0], 90)
    assert fidelity(grey, "a red circle moving left on a plain background") == 1 / 4  # the background only


def test_caption_grammar():
    objects, background = parse_caption(
        "a red circle moving left and a blue square moving up on a checkered background"
    )
    assert objects == [("red", "circle", "left"), ("blue", "square", "up")] and background == "checkered"
    try:
        parse_caption("a red circle moving sideways on a plain background")
    except ValueError as exc:
        assert "demo world" in str(exc)
    else:
        raise AssertionError("a caption outside the grammar parsed")


def test_prompt_encoder_binds_words_to_positions():
    enc = HashPromptEncoder(16)
    a, b = enc(["a red circle and a blue square", "a blue circle and a red square"])
    assert not torch.allclose(a, b)
    assert torch.equal(enc([""])[0], torch.zeros(enc.max_tokens, 16))
    assert torch.equal(enc(["a red circle"]), HashPromptEncoder(16)(["a red circle"]))


def test_embedded_model_draws_what_its_captions_say():
    """The trained demo model, on CPU: its videos show their own captions' facts far better than
    another caption's (a model that ignored its prompt would score the same on both)."""
    from paro_cli.bench.quality import demo_prompts
    from paro_cli.models.loading import load_model
    from paro_cli.recipe import load_recipe
    from paro_cli.runner import sample

    recipe = load_recipe("tiny")
    prompts = demo_prompts(4, recipe, "in-sample")
    vids = sample(load_model("embedded"), recipe, prompts, [0, 1, 2, 3])
    own = sum(fidelity(v, p) for v, p in zip(vids, prompts)) / 4
    other = sum(fidelity(v, p) for v, p in zip(vids, prompts[1:] + prompts[:1])) / 4
    assert own >= 0.5 and own >= other + 0.2, (own, other)

"""Train the embedded demo model: a WanTransformer3DModel on the procedural world, by flow matching.

    python -m paro_cli.demo.train --work runs/demo --max-minutes 9   # resumes; exit 75: not finished, run again
    python -m paro_cli.demo.train --work runs/demo --export paro_cli/demo/weights  # EMA weights + model card + loss curve

Everything is a function of `--seed`: the model's initial weights, and the scenes of step i
(seeded by (seed, i), so a resumed run sees the same data as an uninterrupted one). A run stops
at `--steps` or after `--max-minutes`, whichever comes first, writing a checkpoint (weights,
EMA, optimiser, step, loss history, time spent) that the next run continues from.

The objective is diffusers' FlowMatchEulerDiscreteScheduler convention: x_s = (1 - s) x0 + s n,
the model predicts n - x0 at timestep 1000 s, with s drawn from the same shifted distribution
the sampler's schedule follows (shift 3). One caption in ten is dropped (the empty prompt) so
that classifier-free guidance works.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..models.loading import cast_transformer
from ..models.prompt_encoder import HashPromptEncoder
from .world import render, sample_scene

MODEL_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=64,  # 32 left RoPE 10 dims per spatial axis: too coarse for local attention
    in_channels=3,
    out_channels=3,
    text_dim=64,
    freq_dim=64,
    ffn_dim=1024,
    num_layers=6,
    rope_max_seq_len=64,
)
FRAMES, HEIGHT, WIDTH = 8, 32, 32  # 8 x 16 x 16 = 2,048 tokens with 1x2x2 patches
SHIFT = 3.0
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999
CHECKPOINT = "checkpoint.pt"
UNFINISHED = 75  # exit status of a run that stopped at --max-minutes before --steps (EX_TEMPFAIL)


def batch(seed: int, step: int, size: int, encoder: HashPromptEncoder, device: torch.device):
    """(videos (B, 3, F, H, W) in [-1, 1], caption embeddings) of one training step."""
    rng = random.Random(seed * 1_000_003 + step)
    scenes = [sample_scene(rng, FRAMES, HEIGHT, WIDTH) for _ in range(size)]
    captions = [s.caption if rng.random() >= CAPTION_DROPOUT else "" for s in scenes]
    return render(scenes, FRAMES, HEIGHT, WIDTH, device), encoder(captions).to(device)


def shifted_sigmas(u: torch.Tensor, shift: float = SHIFT) -> torch.Tensor:
    """Noise levels as the flow-matching scheduler spaces them: s = shift u / (1 + (shift - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(model, x0: torch.Tensor, context: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    sigma = shifted_sigmas(torch.rand(x0.shape[0], device=x0.device, generator=generator))
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    s = sigma.view(-1, 1, 1, 1, 1)
    x = (1 - s) * x0 + s * noise
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=x0.device.type == "cuda"):
        pred = model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=context, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), noise - x0)


def build_model(seed: int):
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**MODEL_CONFIG)


def train(work: Path, steps: int, batch_size: int, lr: float, seed: int, max_minutes: float, log=print) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(seed).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    state = {
        "step": 0,
        "losses": [],
        "seconds": 0.0,
        "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    path = work / CHECKPOINT
    if path.is_file():
        saved = torch.load(path, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        optimiser.load_state_dict(saved["optimiser"])
        state = saved["state"]
        log(f"resumed at step {state['step']} ({state['seconds'] / 60:.1f} min so far)")
    # Compiled on CUDA: the eager step is bound by small unfused kernels.
    step_model = torch.compile(model) if device.type == "cuda" else model
    encoder = HashPromptEncoder(MODEL_CONFIG["text_dim"])
    generator = torch.Generator(device)  # reseeded every step from (seed, step)
    start = time.time()
    spent, first = state["seconds"], state["step"]
    pending: list[torch.Tensor] = []  # losses still on the device: reading each one would stall the queue

    def flush():
        if pending:
            state["losses"].extend(torch.stack(pending).tolist())
            pending.clear()

    while state["step"] < steps and time.time() - start < max_minutes * 60:
        step = state["step"]
        generator.manual_seed(seed * 1_000_003 + step)
        for group in optimiser.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 500)  # warm-up, then constant (EMA does the averaging)
        x0, context = batch(seed, step, batch_size, encoder, device)
        loss = flow_matching_loss(step_model, x0, context, generator)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - EMA_DECAY)
        pending.append(loss.detach())
        state["step"] = step + 1
        if state["step"] % 500 == 0:
            flush()
            log(
                f"step {state['step']}: loss {np.mean(state['losses'][-500:]):.4f} ({(time.time() - start) / 60:.1f} "
                "min this run)"
            )
    flush()
    state["seconds"] = spent + time.time() - start
    state.update(batch=batch_size, lr=lr, seed=seed)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"model": model.state_dict(), "ema": ema.state_dict(), "optimiser": optimiser.state_dict(), "state": state}, tmp
    )
    tmp.replace(path)
    log(f"checkpoint at step {state['step']}: {state['seconds'] / 60:.1f} min in all")
    return {**state, "steps_this_run": state["step"] - first}


def loss_curve_png(losses: list[float], path: Path, width: int = 640, height: int = 360) -> None:
    """The training loss (per-step, moving average over 100 steps, log scale) as a PNG line
    chart with a light grid: one horizontal line per power of ten, one vertical per 1,000 steps."""
    import imageio.v3 as iio

    values = np.convolve(np.log10(np.asarray(losses)), np.ones(100) / 100, mode="valid")
    img = np.full((height, width, 3), 255, np.uint8)
    lo, hi = math.floor(values.min()), math.ceil(values.max())
    pad = 20

    def to_y(v):
        return (height - pad - (v - lo) / max(hi - lo, 1e-9) * (height - 2 * pad)).astype(int)

    def to_x(i):
        return (pad + i / max(len(values) - 1, 1) * (width - 2 * pad)).astype(int)

    for decade in range(lo, hi + 1):
        img[to_y(np.array(decade)), pad : width - pad] = 200
    for k in range(0, len(values), 1000):
        img[pad : height - pad, to_x(np.array(k))] = 225
    xs = np.linspace(0, len(values) - 1, 4 * width)
    ys = np.interp(xs, np.arange(len(values)), values)
    img[to_y(ys), to_x(xs)] = (200, 40, 40)
    iio.imwrite(path, img)


def export(work: Path, out: Path) -> None:
    """EMA weights (fp16 safetensors, diffusers layout), loss curve and model card into `out`."""
    saved = torch.load(work / CHECKPOINT, map_location="cpu", weights_only=False)
    state = saved["state"]
    model = build_model(state["seed"])
    model.load_state_dict(saved["ema"])
    out.mkdir(parents=True, exist_ok=True)
    cast_transformer(model, torch.device("cpu"), torch.float16)  # fp16, but the modules Wan keeps in fp32
    model.save_pretrained(out, safe_serialization=True)
    loss_curve_png(state["losses"], out / "loss.png")
    losses = state["losses"]
    params = sum(p.numel() for p in model.parameters())
    card = f"""# paro's embedded demo model

A `WanTransformer3DModel` (the Wan 2.1 class) trained from scratch by `paro_cli/demo/train.py` on
the procedural world of `paro_cli/demo/world.py`: grey backgrounds (plain, striped, checkered),
one or two coloured shapes moving left/right/up/down, captions such as "a red circle moving
left on a striped background". It works in RGB pixels (no VAE), {FRAMES} frames of {HEIGHT}x{WIDTH},
which its 1x2x2 patches make a {FRAMES}x{HEIGHT // 2}x{WIDTH // 2} = {FRAMES * HEIGHT * WIDTH // 4:,} token grid; text comes from
paro's offline hash prompt encoder ({MODEL_CONFIG["text_dim"]} dims).

| | |
|---|---|
| config | `{json.dumps(MODEL_CONFIG)}` |
| parameters | {params:,} (stored as fp16) |
| objective | flow matching (predict noise - x0), noise levels shifted by {SHIFT}, {CAPTION_DROPOUT:.0%} captions dropped |
| optimiser | AdamW, lr {state["lr"]}, 500 warm-up steps, weight decay 0.01, grad clip 1.0; EMA {EMA_DECAY} (these weights) |
| steps x batch | {state["step"]:,} x {state["batch"]} |
| seed | {state["seed"]} |
| training time | {state["seconds"] / 60:.1f} min on {state["card"]} |
| final loss | {np.mean(losses[-500:]):.4f} (mean of the last 500 steps; first 500: {np.mean(losses[:500]):.4f}) |

Loss curve (log scale, 100-step moving average; grid: powers of ten, every 1,000 steps): `loss.png`.

Reproduce: `python -m paro_cli.demo.train --work runs/demo --steps {state["step"]} --batch {state["batch"]} --lr {state["lr"]} --seed {state["seed"]}`
(repeat while it exits with status 75: each run stops at `--max-minutes`), then
`python -m paro_cli.demo.train --work runs/demo --export paro_cli/demo/weights`.
The data and the initial weights follow from the seed exactly; on CUDA the training step is
compiled (`torch.compile`) and GPU kernels are not bitwise deterministic, so a rerun is not
guaranteed to give these weights bit for bit.
"""
    (out / "MODEL_CARD.md").write_text(card)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="checkpoint folder (resumed when it has one)")
    parser.add_argument("--steps", type=int, default=12500, help="total steps over all runs")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=9.0, help="stop (and checkpoint) after this long")
    parser.add_argument(
        "--export", type=Path, help="write the EMA weights, model card and loss curve here instead of training"
    )
    args = parser.parse_args(argv)
    if args.export:
        export(args.work, args.export)
        return
    state = train(args.work, args.steps, args.batch, args.lr, args.seed, args.max_minutes)
    if state["step"] < args.steps:
        if not state["steps_this_run"]:  # rerunning would not help: stop a resume loop here
            sys.exit(f"no training step fits in --max-minutes {args.max_minutes}: raise it")
        print(f"stopped at step {state['step']} of {args.steps}: run the same command again to resume")
        sys.exit(UNFINISHED)


if __name__ == "__main__":
    main()

"""Several GPUs: worker processes, Ulysses context parallelism, each rank's heads.

paro shards nothing itself. diffusers' context parallelism (`ContextParallelConfig`,
`enable_parallelism`, with the family's plan: the adapters' `context_parallel_plan`) splits each
transformer's sequence over the ranks and, inside attention,
trades it (Ulysses all-to-all over NCCL) for a slice of the heads over the whole sequence.
Rank r then holds heads [r*H/P, (r+1)*H/P) of every token, so a per-head plan applies to that
slice unchanged (`local_heads`) and calibration statistics, being per head, are complete on
each rank and only gathered (`gather_heads`). intercept.py runs paro's calls inside the same
all-to-all. Ring attention splits the sequence instead, while a head's order and block mask
span all of it: it is not offered.

`run` is the one entry of the commands: the job in this process for one GPU; in each process
torchrun started (one host or several), as its rank of torchrun's group; else in one spawned
worker per GPU of this host, each with its process group. Rank 0 prints and writes. What the
processes cannot split is refused before any of them loads weights (`check_before_loading`).
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .errors import BackendError, ModelError, ParoError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_primary() -> bool:
    """Whether this process prints and writes (rank 0, or the only process)."""
    return world_size() == 1 or dist.get_rank() == 0


# What torchrun sets in each process it starts (its rendezvous, this process's place in it).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_processes() -> int | None:
    """WORLD_SIZE of the torchrun launch that started this process; None where torchrun did not."""
    return int(os.environ["WORLD_SIZE"]) if all(v in os.environ for v in TORCHRUN_VARIABLES) else None


def processes(gpus: int) -> int:
    """How many processes run a command given --gpus: torchrun's, where it started this one
    (there --gpus may be left at 1 or must say the same), else --gpus of this host."""
    if gpus < 1:
        raise ParoError(f"--gpus {gpus} is not a number of GPUs", "pass --gpus 1 or more")
    launched = torchrun_processes()
    if launched is not None:
        if gpus not in (1, launched):
            raise ParoError(
                f"--gpus {gpus} under torchrun, which started {launched} processes (one GPU each)",
                f"leave --gpus out or pass --gpus {launched}",
            )
        return launched
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > max(found, 1):
        raise BackendError(
            f"--gpus {gpus} needs {gpus} CUDA GPUs, this machine has {found}", f"pass --gpus {found or 1} or fewer"
        )
    return gpus


def run(gpus: int, job: Callable[..., None], *args: Any, recipe=None) -> None:
    """job(*args) in every process of the run: here alone for one GPU; as this process's rank of
    torchrun's group where torchrun started it; else in one spawned worker per GPU (`launch`).
    recipe: the run's recipe, whose model is refused here, before any process loads weights,
    if the processes cannot split it (`check_before_loading`)."""
    count = processes(gpus)
    if recipe is not None:
        check_before_loading(recipe, count)
    if count == 1:
        job(*args)
    elif torchrun_processes() is not None:
        gpu = int(os.environ["LOCAL_RANK"]) if torch.cuda.is_available() else None
        _as_rank(int(os.environ["RANK"]), count, gpu, job, args)
    else:
        launch(count, job, *args)


def launch(processes: int, job: Callable[..., None], *args: Any, device_type: str = "cuda") -> None:
    """Run job(*args) in `processes` spawned workers, one process group (NCCL on CUDA, one GPU a
    rank; gloo on the CPU, for tests). A worker's ParoError is raised here as itself; any other
    failure of a worker stops the rest and is raised as a RuntimeError (the worker's whole
    traceback with PARO_DEBUG=1)."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # not a line per worker it stops
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    with socket.socket() as s:  # a free port for the group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.start_processes(
            _worker,
            args=(processes, port, device_type, errors, job, args),
            nprocs=processes,
            join=True,
            start_method="spawn",
        )
    except ProcessException as exc:
        if not errors.empty():
            raise errors.get() from None
        detail = str(exc).strip() if os.environ.get("PARO_DEBUG") else str(exc).strip().splitlines()[-1]
        raise RuntimeError(f"worker process {exc.error_index} of {processes} failed: {detail}") from None


def _worker(rank: int, processes: int, port: int, device_type: str, errors, job, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a share of the cores each: torch's CPU ops would otherwise run `processes` x cores threads
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
    try:
        _as_rank(rank, processes, rank if device_type == "cuda" else None, job, args)
    except ParoError as exc:
        errors.put(exc)
        raise SystemExit(2) from None


def _as_rank(rank: int, processes: int, gpu: int | None, job, args) -> None:
    """job(*args) as rank `rank` of a group of `processes` (rendezvous at MASTER_ADDR/PORT):
    NCCL on CUDA device `gpu`, gloo on the CPU (gpu None)."""
    if gpu is not None:
        torch.cuda.set_device(gpu)
    # Collectives may wait long: rank 0 times a model alone while the others wait (bench e2e).
    dist.init_process_group(
        "nccl" if gpu is not None else "gloo",
        rank=rank,
        world_size=processes,
        device_id=torch.device("cuda", gpu) if gpu is not None else None,
        timeout=datetime.timedelta(hours=2),
    )
    try:
        job(*args)
        dist.barrier()  # no rank ends (and has the launcher stop the rest) while rank 0 still writes
    finally:
        dist.destroy_process_group()


def check_ulysses(loaded, degree: int, grid: tuple[int, int, int], text_tokens: int = 0) -> None:
    """Refuse, before any work, a model or geometry that Ulysses degree `degree` cannot split."""
    _check_transformers(loaded.components, loaded.adapter, degree)
    _check_tokens(degree, grid, text_tokens)


def check_before_loading(recipe, degree: int) -> None:
    """Refuse what Ulysses degree `degree` cannot split before any process loads weights: the
    recipe's model built from its config on the meta device (models/loading.py) goes through the
    family's plan and the heads; a bare transformer's forward inputs are made there too (shapes
    only), so its token counts are checked as each forward will be. A pipeline's token grid
    depends on its VAE: checked once it is loaded, before any work (`enable_ulysses`)."""
    from .models import adapter_for
    from .models.loaded import LoadedModel, token_grid
    from .models.loading import load_config_only

    found = load_config_only(recipe.model) if degree > 1 else None
    if found is None:  # one process, or a config not at hand
        return
    transformers, in_pipeline = found
    tr = transformers["transformer"]
    adapter = adapter_for(tr)
    _check_transformers(transformers, adapter, degree)
    if in_pipeline:
        return
    meta = torch.device("meta")
    grid = token_grid(LoadedModel(recipe.model, tr, adapter, meta, torch.float32), recipe)
    g = recipe.geometry
    x = torch.empty(1, *adapter.input_shape(tr, g.frames, g.height, g.width), device=meta)
    context = adapter.prompt_encoder(tr)([""]).to(meta)
    inputs = adapter.forward_inputs(tr, x, torch.zeros((), device=meta), context, grid, recipe.sampling.guidance)
    _check_forward(adapter, degree, tr, (), inputs)


def _check_transformers(transformers: dict, adapter, degree: int) -> None:
    """The family's context-parallel plan (refused where it has none) and the heads."""
    for name, transformer in transformers.items():
        adapter.context_parallel_plan(transformer)
        heads = adapter.num_heads(transformer)
        if heads % degree:
            raise ModelError(
                f"{name} has {heads} attention heads, which {degree} GPUs cannot share evenly",
                f"use a number of GPUs that divides {heads}",
            )


def _check_tokens(degree: int, grid: tuple[int, int, int], text_tokens: int) -> None:
    for what, count in (("video/image tokens", grid[0] * grid[1] * grid[2]), ("text tokens", text_tokens)):
        if count % degree:
            raise ModelError(
                f"{count} {what} cannot be split evenly over {degree} GPUs",
                "change the geometry, the text length or the number of GPUs",
            )


def enable_ulysses(loaded, grid: tuple[int, int, int]) -> None:
    """Ulysses context parallelism over every rank, on each transformer of `loaded` (one GPU:
    nothing). diffusers cannot undo it: call it once, before paro installs its attention. The
    text tokens show only in a forward's inputs: each forward checks that they split too."""
    degree = world_size()
    if degree == 1:
        return
    from diffusers import ContextParallelConfig

    check_ulysses(loaded, degree, grid)
    _diffusers_warning_once()
    adapter = loaded.adapter
    for transformer in loaded.components.values():
        transformer.enable_parallelism(
            config=ContextParallelConfig(ulysses_degree=degree), cp_plan=adapter.context_parallel_plan(transformer)
        )
        rank, _, _ = _ulysses(transformer)
        transformer.set_attn_processor(
            {**transformer.attn_processors, **adapter.ulysses_processors(transformer, rank, degree)}
        )
        transformer.register_forward_pre_hook(
            functools.partial(_check_forward, loaded.adapter, degree), with_kwargs=True
        )


def rank_share(loaded) -> str:
    """What each process holds under Ulysses, in a line: diffusers' engine splits activations,
    not weights."""
    degree, heads = world_size(), loaded.adapter.num_heads(loaded.transformer)
    weights = sum(p.numel() * p.element_size() for tr in loaded.components.values() for p in tr.parameters())
    rest = ", and the pipeline's text encoders and VAE" if loaded.pipeline is not None else ""
    size = f"{weights / 2**30:.1f} GiB" if weights >= 2**30 else f"{weights / 2**20:.1f} MiB"
    return (
        f"each of {degree} processes holds all {size} of transformer weights{rest}; its blocks "
        f"run 1/{degree} of the tokens, its attention {heads // degree} of {heads} heads over all of them"
    )


def _check_forward(adapter, degree: int, module, args, kwargs) -> None:
    """Runs before diffusers' own hooks split the inputs (which would fail with an assertion)."""
    _check_tokens(degree, adapter.token_grid(module, args, kwargs), adapter.sequence_layout(args, kwargs).text_len)


def _diffusers_warning_once() -> None:
    """diffusers' context-parallel hooks log through `logger.warning_once` (e.g. that a 1-D
    timestep is left whole), a method that transformers adds to logging.Logger when imported; a
    bare transformer's run imports no transformers, and the call would raise: that one logger is
    given the method. torch.compile cannot trace a logging call (a graph break; an error with
    fullgraph): it is told to skip this one."""
    from diffusers.hooks import context_parallel

    log = context_parallel.logger
    if not hasattr(log, "warning_once"):
        log.warning_once = functools.cache(log.warning)
    method = log.warning_once
    torch._dynamo.config.ignore_logging_functions.add(getattr(method, "__func__", method))


def _ulysses(transformer: torch.nn.Module) -> tuple[int, int, Any] | None:
    """(this rank's index, degree, process group) of `transformer`'s Ulysses mesh; None: none.
    A transformer split by ring attention (by its loader, e.g. from_pretrained's
    parallel_config) is refused."""
    config = getattr(transformer, "_parallel_config", None)
    cp = config.context_parallel_config if config is not None else None
    if cp is not None and cp.ring_degree > 1:
        raise ModelError(
            f"{type(transformer).__name__} runs ring attention (ring_degree {cp.ring_degree}), which splits each "
            "head's sequence over GPUs: paro's per-head orders and block masks span all of it",
            "use Ulysses context parallelism: paro ... --gpus N",
        )
    if cp is None or cp.ulysses_degree == 1:
        return None
    mesh = cp._ulysses_mesh
    return mesh.get_local_rank(), cp.ulysses_degree, mesh.get_group()


def ulysses_degree(transformer: torch.nn.Module) -> int:
    """How many ranks `transformer`'s Ulysses context parallelism spans (1: none)."""
    ulysses = _ulysses(transformer)
    return 1 if ulysses is None else ulysses[1]


def local_heads(transformer: torch.nn.Module, heads: int) -> slice:
    """The heads this rank's attention calls hold: all of them without context parallelism."""
    ulysses = _ulysses(transformer)
    if ulysses is None:
        return slice(0, heads)
    rank, degree, _ = ulysses
    share = heads // degree
    return slice(rank * share, (rank + 1) * share)


def gather_heads(transformer: torch.nn.Module, local: torch.Tensor, dim: int) -> torch.Tensor:
    """Every rank's `local` (its heads along `dim`) joined in head order, on every rank."""
    ulysses = _ulysses(transformer)
    if ulysses is None:
        return local
    _, degree, group = ulysses
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    x = local.to(on).contiguous()
    parts = [torch.empty_like(x) for _ in range(degree)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim).to(local.device)


@functools.lru_cache(maxsize=8)
def gathered_order(
    text_len: int, seq_len: int, degree: int, text_first: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse) of a joint text+visual sequence as the Ulysses all-to-all gathers it.

    diffusers shards text and visual tokens separately (Flux), so rank r's shard is its text
    chunk joined to its visual chunk, and the gathered sequence is [txt_0, vis_0, txt_1, vis_1,
    ...]. gathered[:, order] is the sequence in its layout (all text, then all visual tokens, or
    the reverse); x[:, inverse] takes such a sequence back."""
    text, visual = text_len // degree, (seq_len - text_len) // degree
    first, second = (text, visual) if text_first else (visual, text)  # each shard's two parts, in layout order
    shard = torch.arange(degree)[:, None] * (text + visual)
    order = torch.cat([(shard + torch.arange(first)).flatten(), (shard + first + torch.arange(second)).flatten()]).to(
        device
    )
    return order, torch.argsort(order)

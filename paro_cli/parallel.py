"""Several GPUs of one host: worker processes, Ulysses context parallelism, each rank's heads.

paro shards nothing itself. diffusers' context parallelism (`ContextParallelConfig`,
`enable_parallelism`) splits each transformer's sequence over the ranks and, inside attention,
trades it (Ulysses all-to-all over NCCL) for a slice of the heads over the whole sequence.
Rank r then holds heads [r*H/P, (r+1)*H/P) of every token, so a per-head plan applies to that
slice unchanged (`local_heads`) and calibration statistics, being per head, are complete on
each rank and only gathered (`gather_heads`). intercept.py runs paro's calls inside the same
all-to-all. Ring attention splits the sequence instead, while a head's order and block mask
span all of it: it is not offered.

`run` is the one entry of the commands: the job in this process for one GPU, else in one
spawned worker per GPU, each with its process group, rank 0 printing and writing.
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


def check_gpus(gpus: int) -> None:
    if gpus < 1:
        raise ParoError(f"--gpus {gpus} is not a number of GPUs", "pass --gpus 1 or more")
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > found:
        raise BackendError(
            f"--gpus {gpus} needs {gpus} CUDA GPUs, this machine has {found}", f"pass --gpus {found or 1} or fewer"
        )


def run(gpus: int, job: Callable[..., None], *args: Any) -> None:
    """job(*args) here for one GPU; else in `gpus` worker processes (see `launch`)."""
    if gpus == 1:
        job(*args)
        return
    check_gpus(gpus)
    launch(gpus, job, *args)


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
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    # Collectives may wait long: rank 0 times a model alone while the others wait (bench e2e).
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        rank=rank,
        world_size=processes,
        device_id=torch.device("cuda", rank) if device_type == "cuda" else None,
        timeout=datetime.timedelta(hours=2),
    )
    try:
        job(*args)
        dist.barrier()  # no rank ends (and has the launcher stop the rest) while rank 0 still writes
    except ParoError as exc:
        errors.put(exc)
        raise SystemExit(2) from None
    finally:
        dist.destroy_process_group()


def check_ulysses(loaded, degree: int, grid: tuple[int, int, int], text_tokens: int = 0) -> None:
    """Refuse, before any work, a model or geometry that Ulysses degree `degree` cannot split."""
    for name, transformer in loaded.components.items():
        if getattr(transformer, "_cp_plan", None) is None:
            raise ModelError(
                f"diffusers has no context-parallel plan for {type(transformer).__name__} ({loaded.family})",
                "run this family on one GPU (--gpus 1)",
            )
        heads = loaded.adapter.num_heads(transformer)
        if heads % degree:
            raise ModelError(
                f"{name} has {heads} attention heads, which {degree} GPUs cannot share evenly",
                f"use a number of GPUs that divides {heads}",
            )
    _check_tokens(degree, grid, text_tokens)


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
    _give_diffusers_warning_once()
    for transformer in loaded.components.values():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
        transformer.register_forward_pre_hook(
            functools.partial(_check_forward, loaded.adapter, degree), with_kwargs=True
        )


def _check_forward(adapter, degree: int, module, args, kwargs) -> None:
    """Runs before diffusers' own hooks split the inputs (which would fail with an assertion)."""
    _check_tokens(degree, adapter.token_grid(module, args, kwargs), adapter.sequence_layout(args, kwargs).text_len)


def _give_diffusers_warning_once() -> None:
    """diffusers' context-parallel hooks log through `logger.warning_once`, a method that
    transformers adds to logging.Logger when imported; a bare transformer's run imports no
    transformers, and the call would raise. Give that one logger the method."""
    from diffusers.hooks import context_parallel

    log = context_parallel.logger
    if not hasattr(log, "warning_once"):
        log.warning_once = functools.cache(log.warning)


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

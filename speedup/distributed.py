"""torch.distributed, as launched by torchrun: process group, rank queries and the few
collectives the trainer needs.

speedup never manages processes itself: ``speedup run --nproc N`` runs
``python -m torch.distributed.run --standalone --nproc-per-node N -m speedup run ...``, and any
torchrun invocation (multi-node included) works the same way. Each process reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment torchrun sets; :func:`init` joins the
process group (NCCL on GPUs, gloo on CPUs). Outside torchrun everything here is a no-op for a
world of one.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "init",
    "shutdown",
    "is_distributed",
    "rank",
    "local_rank",
    "world_size",
    "is_main",
    "barrier",
    "all_reduce_sum",
    "all_reduce_max",
    "broadcast_object",
    "all_gather_objects",
    "launched_by_torchrun",
    "average_gradients",
    "average_buffers",
    "match_collective_calls",
    "sum_metric_totals",
    "STRATEGIES",
    "shard_fsdp",
    "BLOCK_NAME",
    "fsdp_incompatible",
]

#: How the model is replicated across processes: DDP keeps a full copy on each and averages
#: gradients; FSDP2 (``fully_shard``) splits parameters, gradients and optimizer state.
STRATEGIES = ("ddp", "fsdp")
#: FSDP shards these modules one by one (then the root): residual and transformer blocks,
#: matched by class name (torchvision BasicBlock/Bottleneck, CIFAR ResNet blocks, GPT2Block,
#: BertLayer, ...). Smaller units mean less memory held at once, more communication calls.
BLOCK_NAME = ("Block", "Bottleneck", "Layer")


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device_type: str | None = None) -> bool:
    """Join the process group torchrun describes (once); True when distributed."""
    if is_distributed():
        return True
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    # Leave the group while the interpreter is still whole (torch asks for an explicit
    # destroy_process_group). What keeps gloo from aborting a finished process is the barrier
    # that ends Trainer.fit: the group's threads live on while DDP still holds it.
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    """Leave the process group, if joined (idempotent; also runs at exit after :func:`init`).
    No barrier: a rank that failed must be able to exit without waiting on the others."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place, also returned); the tensor itself in a world of one."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over ranks (one small tensor collective, no pickling: cheap
    enough for every step); ``value`` itself in a world of one."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def broadcast_object(obj: Any, source: int = 0) -> Any:
    """Rank ``source``'s ``obj`` on every rank (small picklable values only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (small picklable values only)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def average_gradients(parameters: Any) -> None:
    """Average ``.grad`` across processes: for algorithms that run an extra backward pass
    outside DDP's hooks (SAM's second pass). A no-op in a world of one."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def average_buffers(buffers: Any) -> None:
    """Average floating-point buffers across processes (BatchNorm statistics recomputed on
    each process's share of the data). A no-op in a world of one."""
    if not is_distributed():
        return
    for buffer in buffers:
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer /= world_size()


def match_collective_calls(done: int, call: Callable[[], Any]) -> None:
    """This process has made ``done`` calls of a collective; repeat ``call`` until it has made
    as many as the process that made the most. For evaluation under FSDP, where each forward
    is collective (every process gathers the others' shards): a process with a shorter share
    of the eval set repeats a forward (its result dropped) so that none waits forever.
    Nothing in a world of one."""
    if not is_distributed():
        return
    for _ in range(max(all_gather_objects(done)) - done):
        call()


def sum_metric_totals(
    totals: dict[str, list[Any]], device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Add up ``{name: [sum, count]}`` metric totals across processes (each evaluated its own
    share of the eval set), in one collective; ``device`` is where the collective runs (the
    model's, for NCCL). Every process must pass the same names in the same order. The totals
    as floats in a world of one."""
    names = list(totals)
    packed = torch.tensor([[float(totals[n][0]), float(totals[n][1])] for n in names])
    packed = all_reduce_sum(packed.double().to(device)).cpu()
    return {n: [packed[i, 0].item(), packed[i, 1].item()] for i, n in enumerate(names)}


def shard_fsdp(model: torch.nn.Module, param_dtype: str | None = None) -> list[str]:
    """Apply FSDP2's ``fully_shard`` to each block of ``model`` (by class name, outermost
    only), then to the root; returns the sharded blocks' names. ``param_dtype`` ("bf16",
    "fp16") computes in that precision while gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtypes = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    policy = MixedPrecisionPolicy(param_dtype=dtypes[param_dtype], reduce_dtype=torch.float32)
    blocks: list[str] = []
    for name, module in model.named_modules():
        if module is model or any(name.startswith(b + ".") for b in blocks):
            continue
        if type(module).__name__.endswith(BLOCK_NAME) and any(
            p.requires_grad for p in module.parameters()
        ):
            blocks.append(name)
    for name in blocks:
        fully_shard(model.get_submodule(name), mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return blocks


def fsdp_incompatible(declarations: dict[str, Any]) -> list[str]:
    """Algorithms that touch the weights, gradients or masks after INIT: under FSDP each
    process holds only a shard of those, so these algorithms cannot run there (yet)."""
    from speedup.event import Event

    direct = {"model.weights", "model.grads", "masks"}
    return sorted(
        name
        for name, declaration in declarations.items()
        if any(
            direct & (access.reads | access.writes)
            for event, access in declaration.events.items()
            if event != Event.INIT
        )
    )

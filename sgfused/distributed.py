"""Many processes, one run: ``torchrun`` + ``torch.distributed`` (NCCL on GPUs, gloo on CPUs) + DDP.

Launch and rendezvous are torchrun's; collectives are PyTorch's own. This module holds
what the trainer and the evaluator need on top of them; with one process nothing here
runs and every command behaves exactly as before.

Process group. :func:`process_group_from_env` reads torchrun's ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` and initialises the default group only when ``WORLD_SIZE > 1``: NCCL when
the run's device is a GPU (each process then uses ``cuda:LOCAL_RANK``), gloo otherwise.

Batches. ``--batch-size`` is per rank; the global batch is ``batch_size * world_size``.
The seed gives one global caption order (:func:`sgfused.train.epoch_order`), cut into
global batches; rank ``r`` trains the ``r``-th contiguous shard of every global batch
(:func:`shard_bounds`: equal shards, the last global batch split as evenly as it goes,
so the shards in rank order are the global batch).

Global hardest negatives (:func:`global_batch_loss`). Every model's score of pair
``(i, c)`` depends on the images and on caption ``c`` only, but not always on the pair
alone: SAF and MPSM normalise each caption's node scores over all images of the batch
(a per-caption BatchNorm). So the global ``N x N`` score matrix is split by columns:
rank ``r`` gathers the image encodings of all ranks (with gradient; a model whose image
encoder normalises over the batch's images, ``image_batch_statistics`` (MPSM), gets
the raw image batches gathered instead and encodes all of them), scores all ``N``
images against its own captions (``N x N / world`` pairs: the all-pairs work divided by
the world size, and each caption's column complete), and all ranks gather these column
blocks (with gradient) into the global matrix. Captions are never sent. Each rank then
takes, from the hardest-negative loss over the whole matrix, the per-caption terms of
its own captions; the ranks' shares sum to one process's loss on the concatenated
batch, and, since the gathers' backward sums the gradients every rank sends back, the
ranks' parameter gradients sum to that loss's gradient. DDP averages gradients, so the
loss each rank backpropagates is its share times the world size: the averaged gradient
*equals* the one-process gradient (tested in fp64). The per-caption BatchNorm running
statistics are gathered too and applied once, in global caption order, on every rank
(:func:`~sgfused.models.similarity_common.collect_running_stats`), so buffers also match
one process. Dropout draws from a generator seeded with ``seed + rank``: with dropout the
run is the same in distribution, not bit for bit, as one process.

Checkpoints and logs. Rank 0 alone writes (atomically), logs and shows a bar; every rank
reads ``last.pt`` to resume, so ``--out`` must be a folder all nodes see. ``last.pt``
records the world size and every rank's random-number state: a resume with the same world
size is exact, one with another world size is refused in one line (the per-rank batch
and the dropout streams would change the run half-way).

Evaluation (:func:`image_rows`, :func:`gather_rows`). The image rows of the similarity
matrix are split into contiguous blocks, one per rank; every rank encodes all captions,
scores its rows and the blocks are gathered in rank order, so every rank holds the
one-process matrix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

Encoding = Union[Tensor, tuple[Tensor, ...]]
# torch 2.13 renamed the single-tensor collectives (the old names warn)
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes checkpoints and logs."""
        return self.rank == 0


def current_world() -> World:
    """The default process group's world, or one process when none is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), _env_int("LOCAL_RANK", rank))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.strip().isdigit():
        raise ValueError(f"environment variable {name} must be a non-negative integer (torchrun sets it), got {value!r}")
    return int(value)


@contextlib.contextmanager
def process_group_from_env(device: torch.device) -> Iterator[World]:
    """Inside torchrun (``WORLD_SIZE > 1``), the default process group for ``device``'s kind; else one process.

    NCCL for a CUDA device (and ``torch.cuda.set_device(LOCAL_RANK)``), gloo otherwise. The group
    is destroyed on exit, after a barrier when the body succeeded. An already initialised group is used as it is.
    """
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1 or dist.is_initialized():
        yield current_world()
        return
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE is {size} but this torch is built without torch.distributed")
    if device.type == "cuda":
        local = _env_int("LOCAL_RANK", 0)
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK is {local} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield current_world()
        # every rank done before any tears the group down: a rank leaving while another is still in
        # its last collective can abort gloo's worker threads ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device, world: World) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a GPU run of several processes, else ``device``.

    An explicit ``cuda:N`` other than the local rank's GPU would put two ranks on one GPU and is refused.
    """
    if world.size == 1 or device.type != "cuda":
        return device
    if device.index is not None and device.index != world.local_rank:
        raise ValueError(
            f"device is {device} but under torchrun each process uses cuda:LOCAL_RANK (cuda:{world.local_rank} "
            "here); pass cuda or auto"
        )
    return torch.device("cuda", world.local_rank)


# ----------------------------------------------------------------------------- batches


def shard_bounds(batch: int, world: World) -> tuple[int, int]:
    """``(start, stop)`` of this rank's contiguous shard of a global batch of ``batch`` items (sizes differ by <= 1)."""
    base, extra = divmod(batch, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (world.rank < extra)


def rank_order(order: Sequence[int], per_rank: int, world: World) -> list[int]:
    """This rank's items of ``order`` cut into global batches of ``per_rank * world.size``, shard after shard.

    Every shard but the last one holds ``per_rank`` items, so batching the result by ``per_rank``
    gives exactly this rank's shard of every global batch.
    """
    size = per_rank * world.size
    mine: list[int] = []
    for first in range(0, len(order), size):
        batch = order[first : first + size]
        start, stop = shard_bounds(len(batch), world)
        mine.extend(batch[start:stop])
    return mine


# ----------------------------------------------------------------------------- gathers


class _AllGather(torch.autograd.Function):
    """``all_gather`` whose backward sends every rank its piece of the summed gradients (reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        return _all_gather_stacked(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            mine = grad.new_empty(grad.shape[1:])
            _reduce_scatter_single(mine, grad.flatten(0, 1))
            return mine
        total = grad.clone()  # gloo has no reduce-scatter: sum everything, keep this rank's piece
        dist.all_reduce(total)
        return total[dist.get_rank()]


def _all_gather_stacked(tensor: Tensor) -> Tensor:
    """``(world, *tensor.shape)``: every rank's ``tensor`` (gloo takes the output concatenated along dim 0 only)."""
    world = dist.get_world_size()
    out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor.contiguous())
    return out.view(world, *tensor.shape)


def _gathered_shapes(tensor: Tensor) -> list[list[int]]:
    shape = torch.tensor(tensor.shape, dtype=torch.int64, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    return [s.tolist() for s in shapes]


def gather_tensor(tensor: Tensor) -> tuple[Tensor, list[int]]:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order, and each rank's size there.

    The ranks may differ in every dimension: the other dimensions are zero-padded to the
    largest (the models mask padded positions by their lengths or counts). Floating-point
    tensors keep their gradient: each rank's piece receives the sum of the gradients all
    ranks send back. Must be called by every rank (it is a collective).
    """
    shapes = _gathered_shapes(tensor)  # the ranks run the same model: their tensors have as many dimensions
    biggest = [max(s[d] for s in shapes) for d in range(tensor.ndim)]
    padding = [p for d in reversed(range(tensor.ndim)) for p in (0, biggest[d] - tensor.shape[d])]
    wire = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor  # gloo gathers no bool
    padded = F.pad(wire, padding) if any(padding) else wire
    if padded.is_floating_point():
        pieces = _AllGather.apply(padded)
    else:
        pieces = _all_gather_stacked(padded)
    out = torch.cat([pieces[r, : s[0]] for r, s in enumerate(shapes)])
    return (out.bool() if tensor.dtype == torch.bool else out), [s[0] for s in shapes]


def gather_image_batch(images: Any) -> Any:
    """Every rank's :class:`~sgfused.data.batch.ImageBatch` in one, in rank order (tensors, then scene graphs)."""
    parts = {}
    for field in dataclasses.fields(images):
        value = getattr(images, field.name)
        if isinstance(value, Tensor):
            parts[field.name] = gather_tensor(value)[0]
        elif value is not None:
            parts[field.name] = [item for rank_items in gather_objects(value) for item in rank_items]
    return dataclasses.replace(images, **parts)


def gather_encoding(encoding: Encoding) -> Encoding:
    """:func:`gather_tensor` of an encoding, part by part for a tuple encoding."""
    if isinstance(encoding, tuple):
        return tuple(gather_tensor(part)[0] for part in encoding)
    return gather_tensor(encoding)[0]


# ----------------------------------------------------------------------------- the loss


def global_batch_loss(model: nn.Module, batch: Any) -> Tensor:
    """This rank's share of ``model``'s loss over the global batch (module doc); the shares sum to the loss.

    ``batch`` is this rank's :class:`~sgfused.data.batch.PairBatch` shard; ``model`` a
    :class:`~sgfused.models.RetrievalModel` whose :meth:`caption_losses` weighs the
    per-caption hardest-negative terms.
    """
    from .models.similarity_common import collect_running_stats, update_running_stats

    if model.image_batch_statistics:  # every rank encodes every image: the statistics span the global batch
        images = model.encode_images(gather_image_batch(batch.images))
    else:
        images = gather_encoding(model.encode_images(batch.images))
    img_ids, sizes = gather_tensor(batch.images.index)
    with collect_running_stats() as pending:
        columns = model.similarity(images, model.encode_captions(batch.captions))  # (N, own captions)
    for bn, means, variances in pending:  # every rank's per-caption statistics, applied in global caption order
        update_running_stats(bn, gather_tensor(means)[0], gather_tensor(variances)[0])
    scores = gather_tensor(columns.t())[0].t()  # (N, N): every rank's column block
    first = sum(sizes[: dist.get_rank()])
    per_caption = model.caption_losses(scores, img_ids, img_ids)
    return per_caption[first : first + sizes[dist.get_rank()]].sum()


class GlobalBatchLoss(nn.Module):
    """What DDP wraps: ``forward(batch)`` is the model's loss share times the world size (DDP averages gradients)."""

    def __init__(self, model: nn.Module, world: World) -> None:
        super().__init__()
        self.model, self.world_size = model, world.size

    def forward(self, batch: Any) -> Tensor:
        return self.model.loss(batch) * self.world_size


def global_sum(value: Tensor) -> Tensor:
    """The sum over ranks of a (detached) scalar: the global batch's loss from the ranks' shares."""
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    """Wait for every rank (a no-op with one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- evaluation


def image_rows(n_images: int, world: World) -> range:
    """This rank's contiguous block of the ``n_images`` rows of a similarity matrix."""
    if world.size > 1 and n_images < world.size:
        raise ValueError(f"sharded evaluation needs at least one image per rank: {n_images} images, {world.size} ranks")
    return range(*shard_bounds(n_images, world))


def gather_rows(rows: Tensor, device: torch.device) -> Tensor:
    """The ranks' row blocks of a CPU matrix stacked in rank order, on the CPU (sent from ``device``: NCCL needs GPUs)."""
    return gather_tensor(rows.to(device))[0].cpu()

"""The sharded step of a :class:`~optiplug.MatrixOptimizer` under FSDP2: each matrix updated once, by one owner.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps every parameter as a DTensor: each process holds
a shard of each matrix (rows, by default), and gradients arrive reduce-scattered the same way. A
whole-matrix function (an SVD, Newton–Schulz) cannot run on a shard, and running it on every process
after gathering every matrix everywhere repeats the work N times and holds every matrix on every
process. So, for the matrices of one step:

1. every process runs ``matrix_input`` on its shards (elementwise: Muon's momentum);
2. each matrix gets an **owner** process: the largest matrix first, each to the process with the
   least work so far (by elements), so every process owns about 1/N of the matrices' size;
3. one all-to-all sends each shard of each matrix's input and of its matrix state to the owner,
   which assembles the whole tensors;
4. the owner runs ``matrix_update`` once per matrix it owns;
5. one small all-gather tells every process the numbers and tensor layouts of the new matrix state;
   one all-to-all sends each process its shard of each update and of the new matrix state;
6. every process runs ``apply_update`` on its shards.

Between steps every state tensor is a DTensor with its parameter's placements (cut along the same
dimension; a 0-d tensor replicated), so ``torch.distributed.checkpoint`` and
``get_optimizer_state_dict``/``set_optimizer_state_dict`` save and load it like any optimizer state
under FSDP2 — including into a run with another number of processes (a DCP checkpoint is resharded
on load). The gathered tensors are dropped after each step: the owner keeps only its shards.

Matrices are processed in buckets of at most ``MatrixOptimizer.sharded_bucket_bytes`` of whole
tensors, which bounds what an owner holds at once. Supported placements: one sharded mesh dimension
(FSDP2, or HSDP's replicate x shard mesh); tensor parallelism's second sharded dimension is refused.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["assign_owners", "chunk_sizes", "is_sharded", "sharded_matrix_step"]

try:
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:
    try:  # torch 2.4 (the declared floor) keeps DTensor in a private module: FSDP2 parameters are DTensors there too
        from torch.distributed._tensor import DTensor, Replicate
    except ImportError:  # a torch built without distributed support: nothing is ever sharded
        DTensor = None  # type: ignore[assignment,misc]


def is_sharded(tensor: Any) -> bool:
    """True for a DTensor (an FSDP2 parameter, gradient or state shard)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def chunk_sizes(length: int, parts: int) -> list[int]:
    """How ``length`` rows split over ``parts`` processes: ``torch.chunk``'s rule, as DTensor and FSDP2 cut them."""
    size = math.ceil(length / parts) if parts else 0
    return [max(0, min(size, length - i * size)) for i in range(parts)]


def assign_owners(sizes: Sequence[int], processes: int) -> list[int]:
    """An owner for each matrix (by its size in elements): largest first, to the least-loaded process.

    Deterministic (ties go to the earlier matrix and the lower process), so every process computes
    the same assignment without talking to the others.
    """
    loads = [(0, rank) for rank in range(processes)]
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + int(sizes[index]), rank))
    return owners


def _to_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(buffer: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    return buffer.clone().view(dtype).reshape(tuple(shape))


@dataclass
class _Matrix:
    """One matrix of the step, as this process sees it."""

    group: dict[str, Any]
    param: Any  # the DTensor parameter
    dim: int  # the tensor dimension its mesh dimension cuts
    rank: int  # this process's index among the shard group's processes
    processes: int
    local: torch.Tensor = field(init=False)  # this process's shard of the parameter
    state_keys: list[str] = field(default_factory=list)  # the matrix state's tensors, sorted
    owner: int = 0

    def __post_init__(self) -> None:
        self.local = self.param.to_local()

    def rows(self, shape: Sequence[int], rank: int) -> int:
        return chunk_sizes(int(shape[self.dim]), self.processes)[rank]

    def cut(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of ``shape`` is sharded (along ``dim``) or replicated (too few dimensions)."""
        return len(shape) > self.dim

    def shard_numel(self, shape: Sequence[int], rank: int) -> int:
        if not self.cut(shape):
            return math.prod(shape)
        return self.rows(shape, rank) * math.prod(s for i, s in enumerate(shape) if i != self.dim)

    def placements(self, shape: Sequence[int]) -> tuple[Any, ...]:
        mesh = self.param.device_mesh
        return tuple(self.param.placements) if self.cut(shape) else tuple(Replicate() for _ in range(mesh.ndim))

    def distribute(self, local: torch.Tensor, shape: Sequence[int]) -> Any:
        """``local`` (this process's shard of a tensor of ``shape``) as a DTensor cut like the parameter."""
        shape = torch.Size(shape)
        return DTensor.from_local(
            local,
            self.param.device_mesh,
            self.placements(shape),
            run_check=False,
            shape=shape,
            stride=torch.empty(shape, device="meta").stride(),
        )


def _shard_group(param: Any) -> tuple[int, int]:
    """``(mesh dimension, tensor dimension)`` of the parameter's one ``Shard`` placement."""
    shards = [(mesh_dim, p.dim) for mesh_dim, p in enumerate(param.placements) if p.is_shard()]
    others = [p for p in param.placements if not (p.is_shard() or p.is_replicate())]
    if len(shards) != 1 or others:
        raise RuntimeError(
            f"optiplug's sharded matrix step needs each parameter sharded along one mesh dimension (FSDP2, HSDP); "
            f"a parameter of shape {tuple(param.shape)} has placements {tuple(param.placements)}"
        )
    return shards[0]


def _local_view(optimizer: Any, state: dict[str, Any]) -> dict[str, Any]:
    """What ``matrix_input``/``apply_update`` see: elementwise state as local shards, every number."""
    view: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            if key in optimizer.elementwise_state:
                view[key] = value.to_local() if is_sharded(value) else value  # type: ignore[attr-defined]
        else:
            view[key] = value
    return view


def _store_local_view(optimizer: Any, matrix: _Matrix, view: dict[str, Any], before: dict[str, Any]) -> None:
    """Write back what ``matrix_input``/``apply_update`` changed in ``view``: new tensors wrapped as shards."""
    state = optimizer.state[matrix.param]
    for key in [k for k in before if k not in view]:
        state.pop(key, None)
    for key, value in view.items():
        if isinstance(value, torch.Tensor):
            if key not in optimizer.elementwise_state:
                raise RuntimeError(
                    f"{type(optimizer).__name__}: matrix_input/apply_update stored the tensor {key!r}, which is not "
                    f"in elementwise_state; declare it there (a tensor shaped like the parameter's shard, or 0-d)"
                )
            if before.get(key) is not value:
                shape = matrix.param.shape if value.dim() else torch.Size([])
                state[key] = matrix.distribute(value, shape)
        else:
            state[key] = value


def _elementwise(optimizer: Any, matrix: _Matrix, call: Any) -> Any:
    state = optimizer.state[matrix.param]
    view = _local_view(optimizer, state)
    before = dict(view)
    result = call(view)
    _store_local_view(optimizer, matrix, view, before)
    return result


def _buckets(optimizer: Any, matrices: list[_Matrix]) -> list[list[_Matrix]]:
    """Consecutive matrices of one shard group, each bucket at most ``sharded_bucket_bytes`` of whole tensors."""
    buckets: list[list[_Matrix]] = []
    total = 0
    limit = int(optimizer.sharded_bucket_bytes)
    for matrix in matrices:
        state = optimizer.state[matrix.param]
        size = matrix.param.numel() * matrix.param.element_size()
        size += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
        same_group = buckets and buckets[-1][0].param.device_mesh == matrix.param.device_mesh
        if not buckets or not same_group or total + size > limit:
            buckets.append([])
            total = 0
        buckets[-1].append(matrix)
        total += size
    return buckets


def sharded_matrix_step(optimizer: Any, items: Sequence[tuple[dict[str, Any], Any]]) -> int:
    """Step the DTensor matrices ``items`` (``(group, parameter)``, each with a gradient) across their processes.

    Every process of the shard group must call it with the same items in the same order (the base's
    ``step()`` does). Returns how many ``matrix_update`` calls this process ran.
    """
    matrices = []
    for group, param in items:
        mesh_dim, dim = _shard_group(param)
        mesh = param.device_mesh
        matrices.append(_Matrix(group, param, dim, mesh.get_local_rank(mesh_dim), mesh.size(mesh_dim)))
    calls = 0
    for bucket in _buckets(optimizer, matrices):
        calls += _step_bucket(optimizer, bucket)
    return calls


def _step_bucket(optimizer: Any, bucket: list[_Matrix]) -> int:
    import torch.distributed as dist

    first = bucket[0]
    mesh_dim, _ = _shard_group(first.param)
    process_group = first.param.device_mesh.get_group(mesh_dim)
    processes, rank = first.processes, first.rank
    device = first.local.device
    owners = assign_owners([m.param.numel() for m in bucket], processes)

    # 1. elementwise input on every process; 3. every shard of input and matrix state to the owner
    inputs: list[torch.Tensor] = []
    send: list[list[torch.Tensor]] = [[] for _ in range(processes)]
    for matrix, owner in zip(bucket, owners):
        matrix.owner = owner
        grad = matrix.param.grad.to_local()
        x = _elementwise(
            optimizer, matrix, lambda view, m=matrix, g=grad: optimizer.matrix_input(m.local, g, view, m.group)
        )
        if tuple(x.shape) != tuple(matrix.local.shape):
            raise RuntimeError(
                f"{type(optimizer).__name__}.matrix_input returned a tensor of shape {tuple(x.shape)} for a shard of "
                f"shape {tuple(matrix.local.shape)}: it must be shaped like the parameter"
            )
        inputs.append(x)
        state = optimizer.state[matrix.param]
        matrix.state_keys = sorted(
            k for k, v in state.items() if isinstance(v, torch.Tensor) and k not in optimizer.elementwise_state
        )
        send[owner].append(_to_bytes(x))
        for key in matrix.state_keys:
            if matrix.cut(state[key].shape):
                send[owner].append(_to_bytes(state[key].to_local()))
    received = _all_to_all(send, _gather_sizes(optimizer, bucket, inputs, rank, processes), process_group, device)
    del send

    # 4. the owner's whole-matrix updates
    headers: dict[int, dict[str, Any]] = {}
    replies: list[list[torch.Tensor]] = [[] for _ in range(processes)]
    offsets = [0] * processes
    calls = 0
    for index, (matrix, x) in enumerate(zip(bucket, inputs)):
        if matrix.owner != rank:
            continue
        state = optimizer.state[matrix.param]
        whole: dict[str, Any] = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        x_full = _assemble(matrix, received, offsets, matrix.param.shape, x.dtype)
        for key in matrix.state_keys:
            value = state[key]
            if matrix.cut(value.shape):
                whole[key] = _assemble(matrix, received, offsets, value.shape, value.dtype)
            else:
                whole[key] = value.to_local().clone()
        try:
            update = optimizer.matrix_update(matrix.param, x_full, whole, matrix.group)
            header = _header(optimizer, matrix, whole, update)
        except Exception as error:  # tell the other processes, which would wait for this one forever
            header = {"error": f"{type(error).__name__}: {error}"}
            headers[index] = header
            break
        calls += 1
        headers[index] = header
        for target in range(processes):  # copies: the update may be a buffer the next call reuses
            replies[target].append(_to_bytes(_shard_of(matrix, update, target)).clone())
            for key, _shape, _dtype in header["tensors"]:
                replies[target].append(_to_bytes(_shard_of(matrix, whole[key], target)).clone())
        del update, whole, x_full
    del received

    # 5. the new state's layout and numbers to everyone; each process's shards of updates and state
    gathered: list[Any] = [None] * processes
    dist.all_gather_object(gathered, headers, group=process_group)
    every: dict[int, dict[str, Any]] = {}
    for part in gathered:
        every.update(part)
    errors = [h["error"] for h in every.values() if "error" in h]
    if errors:
        raise RuntimeError(f"{type(optimizer).__name__}.matrix_update failed on the owner process: {errors[0]}")
    sizes = [[0] * processes for _ in range(processes)]  # sizes[source][target] in bytes
    for index, matrix in enumerate(bucket):
        header = every[index]
        for target in range(processes):
            nbytes = matrix.shard_numel(matrix.param.shape, target) * header["update"].itemsize
            nbytes += sum(matrix.shard_numel(shape, target) * dtype.itemsize for _, shape, dtype in header["tensors"])
            sizes[matrix.owner][target] += nbytes
    shards = _all_to_all(replies, [sizes[source][rank] for source in range(processes)], process_group, device)
    del replies

    # 6. the new matrix state as shards, then the update of every process's shard
    positions = [0] * processes
    for index, matrix in enumerate(bucket):
        header = every[index]
        piece = shards[matrix.owner]

        def take(shape: Sequence[int], dtype: torch.dtype, m: _Matrix = matrix, buf: torch.Tensor = piece) -> Any:
            local_shape = list(shape)
            if m.cut(shape):
                local_shape[m.dim] = m.rows(shape, rank)
            count = math.prod(local_shape) * dtype.itemsize
            start = positions[m.owner]
            positions[m.owner] = start + count
            return _from_bytes(buf[start : start + count], dtype, local_shape)

        update = take(matrix.param.shape, header["update"])
        state = optimizer.state[matrix.param]
        for key in [k for k, v in state.items() if k not in optimizer.elementwise_state]:
            del state[key]
        state.update(header["numbers"])
        for key, shape, dtype in header["tensors"]:
            state[key] = matrix.distribute(take(shape, dtype), shape)
        _elementwise(
            optimizer, matrix, lambda view, m=matrix, u=update: optimizer.apply_update(m.local, u, view, m.group)
        )
    return calls


def _header(optimizer: Any, matrix: _Matrix, whole: dict[str, Any], update: Any) -> dict[str, Any]:
    if not isinstance(update, torch.Tensor) or tuple(update.shape) != tuple(matrix.param.shape):
        raise RuntimeError(
            f"matrix_update must return the whole update, shaped like the parameter {tuple(matrix.param.shape)}"
        )
    tensors = sorted((k, tuple(v.shape), v.dtype) for k, v in whole.items() if isinstance(v, torch.Tensor))
    numbers = {k: v for k, v in whole.items() if not isinstance(v, torch.Tensor)}
    return {"update": update.dtype, "tensors": tensors, "numbers": numbers}


def _shard_of(matrix: _Matrix, tensor: torch.Tensor, target: int) -> torch.Tensor:
    if not matrix.cut(tensor.shape):
        return tensor
    rows = chunk_sizes(int(tensor.shape[matrix.dim]), matrix.processes)
    start = sum(rows[:target])
    return tensor.narrow(matrix.dim, start, rows[target])


def _assemble(
    matrix: _Matrix, received: list[torch.Tensor], offsets: list[int], shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """The whole tensor of ``shape`` from each process's shard, read at ``offsets`` in what it sent."""
    pieces = []
    for source in range(matrix.processes):
        local_shape = list(shape)
        local_shape[matrix.dim] = matrix.rows(shape, source)
        count = math.prod(local_shape) * dtype.itemsize
        pieces.append(_from_bytes(received[source][offsets[source] : offsets[source] + count], dtype, local_shape))
        offsets[source] += count
    return torch.cat(pieces, dim=matrix.dim)


def _gather_sizes(
    optimizer: Any, bucket: list[_Matrix], inputs: list[torch.Tensor], rank: int, processes: int
) -> list[int]:
    """Bytes this process receives from each process in the gather: the shards of the matrices it owns."""
    sizes = [0] * processes
    for matrix, x in zip(bucket, inputs):
        if matrix.owner != rank:
            continue
        state = optimizer.state[matrix.param]
        for source in range(processes):
            sizes[source] += matrix.shard_numel(matrix.param.shape, source) * x.element_size()
            for key in matrix.state_keys:
                value = state[key]
                if matrix.cut(value.shape):
                    sizes[source] += matrix.shard_numel(value.shape, source) * value.element_size()
    return sizes


def _all_to_all(
    send: list[list[torch.Tensor]], receive_sizes: list[int], process_group: Any, device: torch.device
) -> list[torch.Tensor]:
    """One ``all_to_all_single`` of bytes: ``send[target]`` to each process; what each process sent to this one."""
    import torch.distributed as dist

    parts = [torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8, device=device) for pieces in send]
    output = torch.empty(sum(receive_sizes), dtype=torch.uint8, device=device)
    dist.all_to_all_single(
        output,
        torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device),
        output_split_sizes=list(receive_sizes),
        input_split_sizes=[p.numel() for p in parts],
        group=process_group,
    )
    return list(torch.split(output, list(receive_sizes)))

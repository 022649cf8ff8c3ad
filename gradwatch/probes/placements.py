"""Which piece of an observed tensor this rank holds when the model is split by tensor (or
sequence) parallelism, so that ranks holding the same samples add up to one model.

Ranks of a tensor-parallel mesh see the same samples. What they all hold whole (a replica) is
counted once, on the rank at coordinate 0 of every replicated mesh dimension; pieces of one tensor
(``Shard``) are added, and a piece split along an activation's units (or an attention's heads)
fills its own block of them. Ranks outside that mesh hold other samples (data parallel): they are
always added, and their losses are averaged.

A DTensor says which piece it is. A plain tensor that a parallel style made local
(``use_local_output=True``) is read against the DTensor its module computed, which a hook placed
before the style's sees: a dimension shorter here than there is split. A module's plain output
computed from a split input of the same shape (an activation after a column-wise linear) is
split the same way, and a module handing back its child's output keeps the child's piece; inside
a watched module, what an op computes from a split tensor is split too (queries passed through a
rotary embedding: their heads are). Every other plain tensor is a replica: every rank of the mesh
computes it alike from the same samples.
"""

from __future__ import annotations

import math
import sys
import weakref
from typing import Any, NamedTuple

import torch


class Piece(NamedTuple):
    """This rank's part of one observed tensor."""

    counted: bool  # False: a replica whose copy on another rank is the one counted
    split: tuple[tuple[int, int, int], ...] = ()  # (dim, this rank's offset, global size)
    varies: bool = False  # computed from a split tensor into another shape: split, not known how

    def block(self, dim: int, t: torch.Tensor) -> tuple[int, int] | None:
        """(offset, global size) along ``dim`` of ``t`` when that dimension is split, else None."""
        dim %= max(t.dim(), 1)
        return next(((off, size) for d, off, size in self.split if d == dim), None)


class Mesh(NamedTuple):
    """The tensor-parallel mesh of the model: its ranks hold the same samples."""

    size: int
    first: bool  # this rank is at coordinate 0 on every dimension: it counts the replicas
    coordinate: int  # this rank's place among the mesh's ranks (row-major)


def is_dtensor(t: Any) -> bool:
    # A plain tensor first: asked of every output and gradient a logging step sees. DTensor is
    # not imported here (it costs 0.6 s): none exists before a program has imported it.
    if type(t) is torch.Tensor:
        return False
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local tensor, a plain one as is. A ``Partial``
    DTensor holds addends of a sum still to be made: there is nothing to measure in it yet."""
    if not is_dtensor(t):
        return t
    if any(p.is_partial() for p in t.placements):
        raise ValueError(
            "it is a Partial DTensor (a sum over ranks still pending): attach gradwatch after "
            "parallelize_module, so its hooks see the output the parallel style hands on"
        )
    return t.to_local()


def _mesh_of(device_mesh: Any) -> Mesh:
    coordinate = device_mesh.get_coordinate() or [0] * device_mesh.ndim
    flat = 0
    for dim, c in enumerate(coordinate):
        flat = flat * device_mesh.size(dim) + c
    return Mesh(device_mesh.size(), not any(coordinate), flat)


def _dtensor_piece(t: Any) -> Piece:
    mesh, shape = t.device_mesh, t.shape
    coordinate = mesh.get_coordinate() or [0] * mesh.ndim
    counted, split = True, []
    for i, placement in enumerate(t.placements):
        if placement.is_replicate():
            counted = counted and coordinate[i] == 0
        elif placement.is_shard():
            dim = placement.dim % len(shape)
            chunk = math.ceil(shape[dim] / mesh.size(i))  # torch.chunk's split, as Shard's
            split.append((dim, coordinate[i] * chunk, shape[dim]))
    return Piece(counted, tuple(split))


class Placements:
    """Per forward, the pieces of the tensors seen so far; the model's mesh, once one is seen."""

    def __init__(self) -> None:
        self.mesh: Mesh | None = None
        self._computed: dict[int, tuple[Any, torch.Size, Any]] = {}  # module id -> its DTensor
        # id -> (a weak reference to the tensor, its piece): no temporary outlives its use
        self._known: dict[int, tuple[weakref.ref, Piece]] = {}
        self._inputs: dict[int, torch.Size] = {}  # the model's inputs: data pointer -> shape
        self.input_piece: Piece | None = None  # ... and their piece, once a style reads them
        self.tracking = False  # a split tensor is known in this forward: propagate() matters
        self.active = False  # the model has DTensor parameters: its outputs may be DTensors

    def model_inputs(self, tensors: list[torch.Tensor]) -> None:
        """A forward's inputs: a slice of the sequence under sequence parallelism, which the first
        parallel style that reads one says (it wraps this very storage in a DTensor)."""
        self._inputs = {t.data_ptr(): t.shape for t in tensors if not is_dtensor(t)}
        self.input_piece = None

    def clear(self) -> None:
        self._computed.clear()
        self._known.clear()
        self.tracking = False

    def computed(self, module: Any, output: Any) -> None:
        """A module's output as it computed it, before a parallel style redistributes it."""
        if is_dtensor(output):
            self._computed[id(module)] = (output, output.shape, output.device_mesh)
            if self.mesh is None:
                self.mesh = _mesh_of(output.device_mesh)

    def seen(self, output: torch.Tensor) -> bool:
        """Whether an output needs :meth:`observe`: a tensor-parallel mesh was seen (FSDP alone
        never makes an output a DTensor), or it is a DTensor itself."""
        return self.mesh is not None or is_dtensor(output)

    def counted(self, piece: Piece | None) -> bool:
        """Whether this rank's statistics of a tensor with ``piece`` (None: a plain replica) are
        added to the other ranks'."""
        if piece is not None:
            return piece.counted
        return self.mesh is None or self.mesh.first

    def observe(
        self, module: Any, inp: torch.Tensor | None, outputs: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, Piece | None]:
        """A module's (or a functional call's) outputs and input, made local, and the piece of its
        first output (None: a plain replica)."""
        computed = self._computed.pop(id(module), None) if module is not None else None
        first = outputs[0]
        piece = self.piece_of(first)
        if piece is None and computed is not None and not is_dtensor(first):
            _, shape, mesh = computed
            piece = self._shape_piece(first.shape, shape, mesh)
        if piece is None and inp is not None and inp.shape == first.shape:
            piece = self.piece_of(inp)  # computed alike from a split input
        outputs = [local(t) for t in outputs]
        if piece is not None:
            self._know(outputs[0], piece)
            self._know(first, piece)
        if is_dtensor(inp):
            mine = inp.to_local()
            if self._inputs.get(mine.data_ptr()) == mine.shape:
                self.input_piece = _dtensor_piece(inp)
        inp = local(inp) if inp is not None else None
        return outputs, inp, piece

    def propagate(self, args: tuple, kwargs: dict, out: Any) -> None:
        """An op inside a watched module (the functional mode sees it): its output is split if
        an argument is, the same way when the shape is the same (an elementwise op), else in a
        way not known (a reshape into heads, a rotary embedding's rotation)."""
        piece = source = None
        for a in (*args, *kwargs.values()):
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(t, torch.Tensor) and (piece := self.piece_of(t)) is not None:
                    source = t
                    break
            if source is not None:
                break
        if piece is None or not (piece.split or piece.varies):
            return
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, torch.Tensor) and not is_dtensor(t) and self.piece_of(t) is None:
                same = t.shape == source.shape
                self._know(t, piece if same else Piece(True, (), varies=True))

    def _know(self, t: torch.Tensor, piece: Piece) -> None:
        self._known[id(t)] = (weakref.ref(t), piece)
        self.tracking = True

    def piece_of(self, t: torch.Tensor) -> Piece | None:
        """What is known of a tensor's piece: a DTensor's placements, or what an earlier module
        found for it (or for the tensor it is a view of)."""
        if is_dtensor(t):
            if self.mesh is None:
                self.mesh = _mesh_of(t.device_mesh)
            return _dtensor_piece(t)
        for candidate in (t, t._base):
            if candidate is not None:
                known = self._known.get(id(candidate))
                if known is not None and known[0]() is candidate:
                    piece = known[1]
                    if candidate is t or t.shape == candidate.shape or not piece.split:
                        return piece
                    return Piece(True, (), varies=True)  # a view in another shape of a split one
        return None

    def _shape_piece(self, local_shape: torch.Size, shape: torch.Size, mesh: Any) -> Piece | None:
        if mesh.ndim != 1 or len(local_shape) != len(shape):
            return None
        (c,) = mesh.get_coordinate() or [0]
        split = tuple(
            (d, c * math.ceil(n / mesh.size()), n)
            for d, (m, n) in enumerate(zip(local_shape, shape))
            if m < n
        )
        return Piece(bool(split) or c == 0, split)

    def attention(self, args: tuple, kwargs: dict, caller: Any) -> tuple[tuple, dict, Any]:
        """An attention call's arguments made local, and its heads' block (see :meth:`heads`)."""
        if self.mesh is None:
            return args, kwargs, None
        heads = None
        if args and isinstance(args[0], torch.Tensor):
            heads = self.heads(args[0], caller.heads)
        args = tuple(local(a) if is_dtensor(a) else a for a in args)
        kwargs = {k: local(a) if is_dtensor(a) else a for k, a in kwargs.items()}
        return args, kwargs, heads

    def heads(self, q: torch.Tensor, configured: int | None) -> tuple[int, int] | None:
        """(this rank's block index, blocks) of an attention call's heads when they are split
        over the mesh: its query is a piece of a split tensor, or it has fewer heads than its
        module says it has."""
        mesh = self.mesh
        if mesh is None or mesh.size == 1 or q.dim() < 3:
            return None
        piece = self.piece_of(q)
        if is_dtensor(q):
            return None if piece.block(1, q) is None else (mesh.coordinate, mesh.size)
        if piece is not None and (piece.split or piece.varies):
            return mesh.coordinate, mesh.size
        if configured is not None and q.shape[-3] * mesh.size == configured:
            return mesh.coordinate, mesh.size
        return None

"""One streaming pass over a pretrained model and T fine-tunes: the Gram matrix G = VᵀV (float64).

Per work item (one tensor, or a row chunk of a big one) the T task-vector slices are read, X·Xᵀ is added to
G in float64 (optionally on a GPU), and — in the same pass — the pretrained slice's content digest is taken
so a store can later check that it is applied to the same pretrained model. With ``groups`` one Gram per
layer group is kept as well (for ``--layerwise``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from tvbasis.bases import cosine_from_gram
from tvbasis.engine import Run, as_run
from tvbasis.io.checksum import chunk_key, combine_digests, tensor_digest
from tvbasis.taskset import DEFAULT_CHUNK_ELEMENTS, Item, TaskSet, chunk_for

#: elements per task of one float32 partial product; the partial products are summed in float64. Blocks this
#: small keep float32 rounding at ~1e-8 of sqrt(G_ii G_jj) (tested against a float64 Gram), at the speed of
#: plain float32 products (several times faster than casting everything to float64).
_BLOCK = 1024
#: blocks per batched product: bounds the (blocks, rows, rows) partial results (and any operand copy bmm makes)
_SUPER = 32


@dataclass
class GramResult:
    names: list[str]
    G: np.ndarray  # (T, T) float64
    group_grams: dict[str, np.ndarray] = field(default_factory=dict)
    group_of: dict[str, str] = field(default_factory=dict)
    pretrained_checksum: str | None = None
    chunk_elements: int = 0

    @property
    def norms(self) -> np.ndarray:
        """‖v_t‖ of every task, from the Gram diagonal."""
        return np.sqrt(np.clip(np.diag(self.G), 0.0, None))

    @property
    def cosine(self) -> np.ndarray:
        """The tasks' cosine similarity matrix, from the Gram matrix."""
        return cosine_from_gram(self.G)


def gram_of(x: torch.Tensor) -> torch.Tensor:
    """X·Xᵀ for X (T, n): float32 block products accumulated in float64."""
    return cross_of(x, x)


def cross_of(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """U·Xᵀ for U (M, n), X (T, n) in float64: float32 products over _BLOCK-element blocks (one batched
    product per _SUPER blocks), each block's product summed into the result in float64.

    The blocks are strided views (batch stride _BLOCK, leading dimension n) that BLAS takes as they are: no
    copy of X, which halves the time against copying X's blocks into a contiguous batch."""
    x = x.reshape(x.shape[0], -1).to(torch.float32)
    u = u.reshape(u.shape[0], -1).to(torch.float32)
    n = x.shape[1]
    out = torch.zeros((u.shape[0], x.shape[0]), dtype=torch.float64, device=x.device)
    nb = n // _BLOCK
    if nb:
        xv = x[:, :nb * _BLOCK].reshape(x.shape[0], nb, _BLOCK).transpose(0, 1)
        uv = u[:, :nb * _BLOCK].reshape(u.shape[0], nb, _BLOCK).transpose(0, 1)
        for a in range(0, nb, _SUPER):
            out += torch.bmm(uv[a:a + _SUPER], xv[a:a + _SUPER].transpose(1, 2)).sum(0, dtype=torch.float64)
    if nb * _BLOCK < n:
        out.addmm_(u[:, nb * _BLOCK:].double(), x[:, nb * _BLOCK:].double().T)
    return out


def row_sq_norms(r: torch.Tensor) -> torch.Tensor:
    """‖r_t‖² of every row of r (T, ...) in float64: float32 norms of _BLOCK-element blocks, squares summed in
    float64 (same accuracy as the Gram products, several times faster than a float64 sum of squares)."""
    r = r.reshape(r.shape[0], -1).to(torch.float32)
    n = r.shape[1]
    nb = n // _BLOCK
    out = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)
    if nb:
        blocks = torch.linalg.vector_norm(r[:, :nb * _BLOCK].reshape(r.shape[0], nb, _BLOCK), dim=-1)
        out += blocks.double().square().sum(1)
    if nb * _BLOCK < n:
        out += r[:, nb * _BLOCK:].double().square().sum(1)
    return out


class GramTask:
    """Work unit of the Gram pass (picklable: runs on threads or Ray workers)."""

    def __init__(self, taskset: TaskSet, device: str = "cpu", checksum: bool = True) -> None:
        self.taskset, self.device, self.checksum = taskset, device, checksum

    def __call__(self, item: Item) -> tuple[Item, np.ndarray, bytes | None]:
        name, a, b = item
        spec = self.taskset.specs[name]
        rows = (a, b) if spec.shape else None
        x, pre = self.taskset.deltas_and_pretrained(name, rows)
        digest = tensor_digest(chunk_key(name, a, b), pre) if self.checksum else None
        g = gram_of(x.to(self.device, non_blocking=True))
        return item, g.cpu().numpy(), digest


def compute_gram(taskset: TaskSet, run: Run = None, groups: Callable[[str], str] | None = None,
                 chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS, checksum: bool = True) -> GramResult:
    """G = VᵀV of the task set (float64), per layer group too when ``groups`` maps a tensor name to its group,
    and the pretrained model's content checksum, in one streaming pass."""
    opts = as_run(run)
    eng, device = opts.get_engine(), opts.device
    chunk_elements = chunk_for(taskset.T, chunk_elements)
    items = taskset.items(chunk_elements)
    G = np.zeros((taskset.T, taskset.T))
    per_group: dict[str, np.ndarray] = {}
    group_of: dict[str, str] = {}
    digests: list[tuple[str, bytes]] = []
    task = GramTask(taskset, device, checksum)
    for (name, a, b), g, d in eng.map(task, items, desc="gram pass", sizes=[taskset.item_bytes(i) for i in items]):
        G += g
        if groups is not None:
            key = group_of.setdefault(name, groups(name))
            per_group[key] = per_group.get(key, 0.0) + g
        if d is not None:
            digests.append((chunk_key(name, a, b), d))
    return GramResult(taskset.names, G, per_group, group_of,
                      combine_digests(digests) if checksum else None, chunk_elements)

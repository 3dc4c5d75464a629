"""``sparse-rows``: keep only the rows of the 2-D view that hold a nonzero entry.

For an embedding matrix where fine-tuning changed k of m rows: stored ``index`` (int32, the k row numbers,
ascending) and the k rows, as float32 ``rows`` (k, n) — lossless — or as child ``rows`` of the NEXT codec
(``sparse-rows+int8``). Bytes: 4·k + (4·k·n, or the NEXT codec's bytes for a (k, n) tensor). Decoding scatters
the rows into zeros. Rows are those of ``as_matrix`` (a 1-d tensor is one row). The nonzero scan runs in row
chunks; the gathered rows are the only copy the size of the kept part.
"""

from __future__ import annotations

import torch

from tvbasis.codecs.base import Codec, as_matrix, row_chunk
from tvbasis.codecs.cast import _Cast
from tvbasis.codecs.encoded import Encoded
from tvbasis.codecs.lowrank import LowRank
from tvbasis.codecs.quant import _IntQuant


class SparseRows(Codec):
    """Nonzero rows only, with their int32 row indices; rows raw float32 or through the NEXT codec."""

    name = "sparse-rows"
    takes_next = True

    def _encode(self, x: torch.Tensor) -> Encoded:
        # a NEXT that codes its input into new tensors (quantisers, casts, low rank) only reads the rows: when every
        # row is kept they need not be copied first
        index, kept, meta = self.split(x, copy=not isinstance(self.next, (_IntQuant, _Cast, LowRank)))
        return self.assemble(x, index, meta, kept if self.next is None else self.next.encode(kept))

    def split(self, x: torch.Tensor, copy: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        """(int32 indices of the rows of ``x``'s 2-D view that hold a nonzero, those rows, the entry's meta): the
        part of an encoding that does not depend on how the rows are coded (``budget.measure`` codes one split
        with every candidate). ``copy=False``: when every row holds a nonzero, the rows are ``x``'s 2-D view
        itself, not a copy (for a caller that only reads them)."""
        m = as_matrix(x)
        rows, cols = m.shape
        if rows > torch.iinfo(torch.int32).max:
            raise ValueError(f"codec {self.name!r}: {rows} rows do not fit int32 indices")
        step = row_chunk(cols, 1)
        nonzero = torch.cat([(m[r0:r0 + step] != 0).any(dim=1) for r0 in range(0, rows, step)])
        index = torch.nonzero(nonzero).reshape(-1)
        kept = m if not copy and index.numel() == rows else m.index_select(0, index)
        return index.to(torch.int32), kept, {"rows_kept": int(index.numel()), "rows": rows}

    def assemble(self, x: torch.Tensor, index: torch.Tensor, meta: dict[str, int],
                 rows: torch.Tensor | Encoded) -> Encoded:
        """The encoding of ``x`` from its ``split`` and its kept rows, raw (no NEXT) or coded by NEXT."""
        tensors = {"index": index}
        if self.next is None:
            assert isinstance(rows, torch.Tensor)
            tensors["rows"] = rows
            return self._make(x, tensors, meta)
        assert isinstance(rows, Encoded)
        return self._make(x, tensors, meta, {"rows": rows})

    def _fresh_decode(self) -> bool:
        """Whether NEXT decodes into a new float32 tensor (never a view of what is stored)."""
        nxt = self.next
        return isinstance(nxt, (_IntQuant, LowRank)) or (isinstance(nxt, _Cast) and nxt.dtype != torch.float32)

    def _decode(self, enc: Encoded) -> torch.Tensor:
        shape = enc.shape
        rows = shape[0] if len(shape) >= 2 else 1
        cols = enc.numel // rows
        index = enc.tensors["index"].long()
        kept = enc.tensors["rows"].float() if self.next is None else self.next.decode(enc.children["rows"])
        if index.numel() == rows and self._fresh_decode() and kept.dtype == torch.float32 and \
                bool(torch.equal(index, torch.arange(rows, device=index.device))):
            return kept.reshape(rows, cols)  # every row kept, in order: the decoded rows are the tensor (no scatter)
        out = torch.zeros(rows, cols, dtype=torch.float32, device=index.device)
        if index.numel():
            out.index_copy_(0, index, kept.reshape(index.numel(), cols).to(out.device))
        return out

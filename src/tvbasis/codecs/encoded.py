"""``Encoded``: what one codec stores for one tensor, and its round trip through a flat tensor dict.

An ``Encoded`` is a tree: its own named tensors plus named children (the sub-tensors a chained codec handed
to the NEXT codec, e.g. the two low-rank factors). ``nbytes`` is the exact byte count of every stored tensor in
the tree, i.e. what a safetensors file would hold for it (headers excluded).

Flat form (``to_tensors(prefix)``): own tensor ``t`` becomes key ``prefix + t``; child ``c`` is flattened with
prefix ``prefix + c + "."``. The JSON-able description returned beside it records the codec spec, the shape, the
codec's meta, the names of its own tensors and the children's descriptions, so ``from_tensors`` picks exactly
its keys out of a dict that may hold many other tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tvbasis.errors import StoreError


@dataclass
class Encoded:
    """One tensor as stored by a codec."""

    #: canonical spec of the codec that produced it (``Codec.spec``), enough to decode it
    codec: str
    #: shape of the original tensor
    shape: tuple[int, ...]
    #: stored tensors, by name (names hold no ".")
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    #: small JSON-able facts the decoder or a reader needs (chosen rank, position format, ...)
    meta: dict[str, Any] = field(default_factory=dict)
    #: sub-encodings made by a chained NEXT codec, by name
    children: dict[str, Encoded] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Exact bytes of every stored tensor in this tree: Σ numel·itemsize."""
        own = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return own + sum(c.nbytes for c in self.children.values())

    @property
    def numel(self) -> int:
        """Number of elements of the decoded tensor."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    def to_tensors(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Flatten to ``({key: tensor}, description)``; the description is JSON-able."""
        flat: dict[str, torch.Tensor] = {}
        for name, t in self.tensors.items():
            if "." in name:
                raise ValueError(f"tensor name {name!r} must not contain '.'")
            flat[prefix + name] = t.contiguous()
        children: dict[str, Any] = {}
        for cname, child in self.children.items():
            sub, desc = child.to_tensors(f"{prefix}{cname}.")
            overlap = flat.keys() & sub.keys()
            if overlap:
                raise ValueError(f"flattened keys collide: {sorted(overlap)}")
            flat.update(sub)
            children[cname] = desc
        desc_out = {"codec": self.codec, "shape": list(self.shape), "tensors": sorted(self.tensors),
                    "meta": self.meta, "children": children}
        return flat, desc_out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], description: Mapping[str, Any],
                     prefix: str = "") -> Encoded:
        """Inverse of :meth:`to_tensors` (``tensors`` may hold other keys too)."""
        try:
            codec = str(description["codec"])
            shape = tuple(int(d) for d in description["shape"])
            names = list(description.get("tensors", []))
            meta = dict(description.get("meta", {}))
            child_desc = dict(description.get("children", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"malformed encoded-tensor description under prefix {prefix!r}: {e}") from None
        own: dict[str, torch.Tensor] = {}
        for name in names:
            key = prefix + name
            if key not in tensors:
                raise StoreError(f"encoded tensor {key!r} ({codec}) is missing")
            own[name] = tensors[key]
        children = {c: cls.from_tensors(tensors, d, f"{prefix}{c}.") for c, d in child_desc.items()}
        return cls(codec=codec, shape=shape, tensors=own, meta=meta, children=children)

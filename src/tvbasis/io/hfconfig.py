"""The dtype a written model's ``config.json`` states, made to match the dtype of the weights actually written.

A model directory's ``config.json`` is copied from the pretrained model, so it names the pretrained dtype
(``"torch_dtype": "float32"`` in older configs, ``"dtype"`` in transformers ≥ 4.56). When the output is written in
another dtype (``--dtype bfloat16``, a mergekit YAML's ``dtype: float16``), transformers' ``from_pretrained``
would load the weights in the config's dtype. As mergekit does, the written config states the written dtype:
every ``torch_dtype``/``dtype`` key is updated, at the top level and in nested sub-configs (``text_config`` and
the like), and a config with neither key gets ``torch_dtype``, which every transformers version reads.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from tvbasis.io.specs import TensorSpec, dtype_name

__all__ = ["CONFIG_DTYPE_KEYS", "set_config_dtype", "written_dtype"]

log = logging.getLogger(__name__)

#: the keys a Hugging Face config uses for the weights' dtype (older name first)
CONFIG_DTYPE_KEYS = ("torch_dtype", "dtype")
#: nesting levels of sub-configs visited (multimodal configs nest one or two levels)
_MAX_DEPTH = 4


def written_dtype(specs: Iterable[TensorSpec]) -> torch.dtype | None:
    """The dtype of the floating tensors written, weighted by bytes (the one that holds most bytes when they are
    mixed); None when nothing floating is written."""
    by_bytes: Counter[torch.dtype] = Counter()
    for s in specs:
        if s.is_float:
            by_bytes[s.dtype] += s.nbytes
    if not by_bytes:
        return None
    return max(by_bytes.items(), key=lambda kv: (kv[1], str(kv[0])))[0]


def _update(node: dict[str, object], name: str, depth: int) -> int:
    n = 0
    for key in CONFIG_DTYPE_KEYS:
        if key in node and (node[key] is None or isinstance(node[key], str)):
            node[key] = name
            n += 1
    if depth < _MAX_DEPTH:
        for value in node.values():
            if isinstance(value, dict):
                n += _update(value, name, depth + 1)
    return n


def set_config_dtype(path: Path, dtype: torch.dtype) -> bool:
    """Rewrite ``config.json`` at ``path`` so that its dtype keys name ``dtype``; returns whether it was written.

    The file was copied from an untrusted model directory: one that is not a JSON object is left as it was (with
    a logged warning; transformers will refuse it on its own)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("%s: not updating its dtype, it is not readable JSON (%s)", path, e)
        return False
    if not isinstance(config, dict):
        log.warning("%s: not updating its dtype, it is not a JSON object", path)
        return False
    name = dtype_name(dtype)
    if _update(config, name, 0) == 0:
        config["torch_dtype"] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    return True

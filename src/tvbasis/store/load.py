"""A store's task as a model in memory: ``load_task`` (``tvbasis.load_task``), nothing written.

The pretrained files are checked against the store (structure, then the content checksum), the model is loaded —
a ``transformers`` model of the class the pretrained ``config.json`` names when transformers is installed and
loads exactly the checkpoint's weights (none missing or initialised at random), else a state dict of tensors —
and the task is added into it in place by ``store/apply.py`` (tensor by tensor, low-rank entries as ``addmm``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tvbasis.io import Checkpoint, open_checkpoint
from tvbasis.io.checksum import check_pretrained_checksum, chunk_digests
from tvbasis.store.apply import StateModule, apply_into
from tvbasis.store.store import BasisStore


def load_task(store: BasisStore | str | Path, task: str, pretrained: str | Path | Checkpoint,
              scale: float = 1.0) -> Any:
    """Task ``task``'s model θ₀ + scale·ṽ_task in memory (nothing written): a ``transformers`` model of the class
    the pretrained ``config.json`` names when transformers is installed and knows it, else a state dict
    ``{name: tensor}`` of every pretrained tensor (the pretrained dtypes). The pretrained files are checked
    against the store first (structure and content checksum)."""
    st = store if isinstance(store, BasisStore) else BasisStore.open(store)
    st.task_index(task)
    pre = pretrained if isinstance(pretrained, Checkpoint) else open_checkpoint(pretrained)
    st.check_pretrained(pre)
    ref = st.manifest.pretrained
    if ref.checksum is not None:
        digests = []
        for s in st.specs.values():
            digests.extend(chunk_digests(s, pre.get(s.name), ref.checksum_chunk_elements))
        check_pretrained_checksum(digests, ref.to_json(), pre.path, "; nothing loaded")
    model = _hf_model(pre)
    if model is None:
        state = {s.name: pre.get(s.name).clone() for s in pre.specs()}
        holder = StateModule(state)
        apply_into(st, holder, task, scale)
        return holder.state
    apply_into(st, model, task, scale)
    return model




def _hf_model(pre: Checkpoint) -> torch.nn.Module | None:
    """The transformers model of the pretrained directory (the class its config's ``architectures`` names, else
    ``AutoModel``; weights in their stored dtype), or None when transformers is not installed or cannot load it."""
    root = pre.root_dir
    if root is None or not (Path(root) / "config.json").is_file():
        return None
    try:
        import transformers
    except ImportError:
        return None
    try:
        config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), transformers.AutoModel)
        model, info = cls.from_pretrained(str(root), local_files_only=True, dtype="auto", output_loading_info=True)
    except Exception:  # an unknown or partial config: the state dict is the answer
        return None
    if any(info.get(k) for k in ("missing_keys", "mismatched_keys", "error_msgs")):
        return None  # the class does not hold exactly these weights (it would initialise some at random)
    model.eval()
    return model

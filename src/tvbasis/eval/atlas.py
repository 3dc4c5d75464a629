"""aTLAS (Zhang et al., arXiv 2407.02880): task vectors composed with learned anisotropic scaling.

Each component c (a task vector, or a store's basis) is split into blocks — its parameter tensors — and the
edited model is θ = θ₀ + Σ_c Σ_b a_{c,b}·τ_{c,b}: one coefficient per component and block, learned by gradient
descent on a few examples. The objective is the cross-entropy of each example under its task's frozen zero-shot
head (``supervised``) or, for test-time adaptation without labels, the entropy of the predicted distribution
(``entropy``). With ``blockwise`` off there is one coefficient per component (the paper's "standard" variant).
Over a store's M bases it is the same problem with M components instead of T (``store_components``).

Defaults follow the released code (github.com/fredzzhang/atlas, ``src/learn_few_shots.py``,
``src/composition.py``): coefficients start at 0, AdamW with lr 0.1, a cosine schedule without warm-up,
gradients clipped to norm 1, one evaluation per epoch and the best epoch's coefficients kept (on ``select``,
else on the training examples; a tie goes to the later epoch, which matters on a few examples). tvbasis differs in having no data augmentation (texts) and weight decay 0.

The coefficients are saved as JSON (``save_coefficients``) and applied as a lazy task vector
(``atlas_vector``: Σ_c a_{c,b}·τ_{c,b} tensor by tensor), so ``--out`` writes θ₀ + that edit like any ``--combine``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tvbasis.errors import ConfigError
from tvbasis.eval.encoder import Encoder
from tvbasis.eval.finetune_modes import Functional
from tvbasis.eval.heads import build_head
from tvbasis.eval.metrics import accuracy
from tvbasis.eval.tasks import Task
from tvbasis.io.atomic import atomic_output
from tvbasis.vectors import Producer, TaskVector

Delta = Mapping[str, torch.Tensor]
OBJECTIVES = ("supervised", "entropy")
COEF_KIND = "tvbasis-atlas-coefficients"


@dataclass(frozen=True)
class AtlasSettings:
    objective: str = "supervised"  # supervised (cross-entropy on labels) | entropy (test-time adaptation)
    blockwise: bool = True         # one coefficient per (component, parameter tensor); off: per component
    epochs: int = 10
    lr: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0

    def check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"aTLAS objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0 or self.max_length < 2:
            raise ConfigError(f"invalid aTLAS settings: {self}")


@dataclass
class AtlasResult:
    components: list[str]
    blocks: list[str]
    coefficients: torch.Tensor          # (C, B), or (C, 1) when not blockwise
    settings: AtlasSettings
    history: list[dict[str, Any]] = field(default_factory=list)  # per epoch: loss, selection accuracy
    best_epoch: int = 0
    seconds: float = 0.0

    def per_component(self) -> dict[str, dict[str, float]]:
        """component -> block -> coefficient (every block, also when not blockwise)."""
        c = self.coefficients
        return {name: {b: float(c[i, j if c.shape[1] > 1 else 0]) for j, b in enumerate(self.blocks)}
                for i, name in enumerate(self.components)}

    def mean_coefficients(self) -> dict[str, float]:
        return {name: float(self.coefficients[i].mean()) for i, name in enumerate(self.components)}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": COEF_KIND, "components": self.components, "blocks": self.blocks,
                "blockwise": self.settings.blockwise, "coefficients": self.per_component(),
                "mean_coefficients": self.mean_coefficients(), "settings": asdict(self.settings),
                "history": self.history, "best_epoch": self.best_epoch, "seconds": round(self.seconds, 2)}


def _blocks(encoder: Encoder, components: Mapping[str, Delta]) -> list[str]:
    """The encoder parameter names (resolved) that some component changes, in the model's order."""
    touched: set[str] = set()
    for comp in components.values():
        for k in comp:
            touched.add(encoder._resolve(k))
    params = [n for n, _ in encoder.model.named_parameters()]
    out = [n for n in params if n in touched]
    if not out:
        raise ConfigError("aTLAS: the components change no parameter of the model")
    return out


def _stack(encoder: Encoder, components: Mapping[str, Delta], blocks: Sequence[str]) -> dict[str, torch.Tensor]:
    """block -> (C, *shape) float32 stack of the components' tensors (zeros where a component lacks it)."""
    shapes = dict(encoder.model.named_parameters())
    resolved = [{encoder._resolve(k): v for k, v in comp.items()} for comp in components.values()]
    out = {}
    for b in blocks:
        out[b] = torch.stack([r[b].to(torch.float32) if b in r else torch.zeros(shapes[b].shape) for r in resolved])
    return out


def learn_coefficients(encoder: Encoder, components: Mapping[str, Delta], train: Mapping[str, Task],
                       settings: AtlasSettings | None = None, split: str = "train", select: str | None = None,
                       progress: bool = False) -> AtlasResult:
    """Learn aTLAS coefficients on the ``split`` examples of ``train`` (each task with its own frozen head);
    keep the epoch with the best mean accuracy on ``select`` (a split name; None: the training examples) — for
    the entropy objective the lowest mean entropy there, so no label is read.
    The encoder is left at θ₀."""
    settings = settings or AtlasSettings()
    settings.check()
    if not components:
        raise ConfigError("aTLAS needs at least one task vector or basis")
    if not train:
        raise ConfigError("aTLAS needs examples (a --task file)")
    t0 = time.time()
    encoder.reset()
    names = list(components)
    blocks = _blocks(encoder, components)
    stacks = _stack(encoder, components, blocks)
    theta0 = {n: encoder.pretrained_state[n].to(torch.float32) for n, _ in encoder.model.named_parameters()}
    heads = {t: build_head(encoder, task) for t, task in train.items()}
    data = []
    for t, task in train.items():
        sp = task[split]
        toks = encoder.tokenize(sp.texts, settings.max_length)
        data += [(t, toks[i], int(sp.labels[i])) for i in range(len(sp))]
    if not data:
        raise ConfigError(f"aTLAS: no {split} examples")
    C, B = len(names), (len(blocks) if settings.blockwise else 1)
    coef = torch.nn.Parameter(torch.zeros(C, B))
    opt = torch.optim.AdamW([coef], lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(data) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(settings.seed)
    model = encoder.model
    model.eval()  # coefficients only: no dropout, as the paper's composed encoder in eval mode

    def params(c: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(theta0)
        for j, b in enumerate(blocks):
            col = c[:, j if B > 1 else 0]
            out[b] = theta0[b] + torch.tensordot(col, stacks[b], dims=1)
        return out

    def evaluate(c: torch.Tensor) -> float:
        """The selection score: mean accuracy, or for the entropy objective (no labels) minus the mean entropy."""
        with torch.no_grad():
            delta = {b: torch.tensordot(c[:, j if B > 1 else 0], stacks[b], dims=1) for j, b in enumerate(blocks)}
            encoder.set_delta(delta, 1.0)
            try:
                scores = []
                for t, task in train.items():
                    sp = task[select or split]
                    logits = heads[t].logits(encoder.encode(sp.texts, max_length=settings.max_length))
                    if settings.objective == "supervised":
                        scores.append(accuracy(logits.argmax(-1), sp.labels))
                    else:
                        scores.append(float((logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()))
            finally:
                encoder.reset()
        return sum(scores) / len(scores)

    best = evaluate(coef.detach())
    best_coef, best_epoch = coef.detach().clone(), 0
    history: list[dict[str, Any]] = [{"epoch": 0, "select_score": best}]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="aTLAS", unit="step", leave=False)
    try:
        for epoch in range(1, settings.epochs + 1):
            perm = torch.randperm(len(data), generator=gen).tolist()
            losses = []
            for s in range(0, len(data), settings.batch_size):
                batch = [data[i] for i in perm[s:s + settings.batch_size]]
                opt.zero_grad(set_to_none=True)
                ps = params(coef)
                loss = torch.zeros(())
                for t in {b[0] for b in batch}:
                    rows = [b for b in batch if b[0] == t]
                    inputs = encoder.collate([r[1] for r in rows], list(range(len(rows))))
                    emb = encoder.forward(inputs, model=Functional(model, ps))
                    logits = heads[t].logits(emb)
                    if settings.objective == "supervised":
                        y = torch.tensor([r[2] for r in rows])
                        part = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
                    else:
                        part = -(logits.softmax(-1) * logits.log_softmax(-1)).sum()
                    loss = loss + part / len(batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([coef], 1.0)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
            acc = evaluate(coef.detach())
            history.append({"epoch": epoch, "loss": sum(losses) / len(losses), "select_score": acc})
            if acc >= best:  # a tie goes to the later epoch (more training; the paper's code keeps the earlier)
                best, best_coef, best_epoch = acc, coef.detach().clone(), epoch
    finally:
        if bar is not None:
            bar.close()
        encoder.reset()
    return AtlasResult(names, blocks, best_coef, settings, history, best_epoch, time.time() - t0)


class _AtlasProducer(Producer):
    def __init__(self, components: Mapping[str, TaskVector], coefficients: Mapping[str, Mapping[str, float]]) -> None:
        self.components, self.coefficients = dict(components), coefficients

    def __call__(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        out: torch.Tensor | None = None
        for c, tv in self.components.items():
            a = self.coefficients.get(c, {}).get(name, 0.0)
            if a == 0.0 or name not in tv:
                continue
            part = tv.get(name, rows).to(torch.float32) * a
            out = part if out is None else out.add_(part)
        if out is None:
            any_tv = next(iter(self.components.values()))
            out = torch.zeros_like(any_tv.get(name, rows), dtype=torch.float32)
        return out


def atlas_vector(components: Mapping[str, TaskVector], coefficients: Mapping[str, Mapping[str, float]],
                 name: str = "aTLAS") -> TaskVector:
    """The lazy task vector Σ_c a_{c,b}·τ_{c,b}: tensor b of component c scaled by its coefficient (0 where none
    is given). Coefficient blocks are the tensors' names as the components name them."""
    unknown = sorted(set(coefficients) - set(components))
    if unknown:
        raise ConfigError(f"aTLAS coefficients for unknown component(s) {unknown}; components: {sorted(components)}")
    first = next(iter(components.values()))
    return TaskVector.from_producer(first.specs, _AtlasProducer(components, coefficients), first.pretrained, name)


def component_coefficients(result: AtlasResult, components: Mapping[str, TaskVector],
                           encoder: Encoder) -> dict[str, dict[str, float]]:
    """The learned coefficients keyed by each component's own tensor names (the vector's, not the encoder's)."""
    per = result.per_component()
    out: dict[str, dict[str, float]] = {}
    for c, tv in components.items():
        out[c] = {}
        for k in tv.keys():
            try:
                b = encoder._resolve(k)
            except Exception:
                continue
            if b in per.get(c, {}):
                out[c][k] = per[c][b]
    return out


def save_coefficients(path: str | Path, result: AtlasResult, extra: Mapping[str, Any] | None = None,
                      force: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """Write the coefficients (and how they were learned) as JSON, atomically, under the output rules."""
    path = Path(path)
    text = json.dumps({**result.to_dict(), **(extra or {})}, indent=2, sort_keys=True) + "\n"
    with atomic_output(path, force, inputs, directory=False) as tmp:
        tmp.write_text(text)
    return path


def load_coefficients(path: str | Path) -> dict[str, dict[str, float]]:
    """component -> block -> coefficient from a file ``save_coefficients`` wrote; ConfigError on anything else."""
    from tvbasis.untrusted import load_json

    try:
        data = load_json(Path(path).read_bytes(), str(path), ConfigError, 1 << 26, "aTLAS coefficients")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read aTLAS coefficients ({e.strerror or type(e).__name__})") from None
    if not isinstance(data, dict) or data.get("kind") != COEF_KIND or not isinstance(data.get("coefficients"), dict):
        raise ConfigError(f"{path}: not an aTLAS coefficients file (kind {COEF_KIND!r} with 'coefficients')")
    out: dict[str, dict[str, float]] = {}
    for c, blocks in data["coefficients"].items():
        if not isinstance(blocks, dict):
            raise ConfigError(f"{path}: coefficients of {c!r} must map tensor names to numbers")
        out[c] = {}
        for b, v in blocks.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{path}: coefficient {c!r}/{b!r} must be a finite number, got {v!r}")
            out[c][b] = float(v)
    return out


def store_components(store: Any) -> dict[str, TaskVector]:
    """A basis store's M bases (and its mean, when it keeps one) as components for aTLAS: 'basis0', … 'mean'."""
    from tvbasis.vectors import TaskVector as TV

    class _Rows(Producer):
        def __init__(self, m: int | None) -> None:
            self.m = m

        def __call__(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
            if self.m is None:
                mu = store.mean_rows(name, rows)
                assert mu is not None
                return mu
            return store.bases_rows(name, rows)[self.m]

    if store.M == 0:
        raise ConfigError(f"{store.root}: the store keeps no bases (M = 0); give the fine-tunes instead")
    out = {f"basis{m}": TV.from_producer(store.specs, _Rows(m), None, f"basis {m}") for m in range(store.M)}
    first = next(iter(store.specs))
    if store.mean_rows(first) is not None:
        out["mean"] = TV.from_producer(store.specs, _Rows(None), None, "mean")
    return out


def tune_atlas(args: Any, pre: Any, vectors: Mapping[str, TaskVector], store: Any, tasks: Mapping[str, Task],
               encoder: Encoder, report: str | None, progress: bool = True) -> int:
    """``tvbasis tune --method atlas``: learn (or, with --apply-coefficients, load) the coefficients over the
    task vectors or the store's bases on the --task dev files, report dev (and --test) accuracy, write
    --save-coefficients, --out (θ₀ + the edit) and --json."""
    from tvbasis.engine import RunOptions
    from tvbasis.eval.userdata import encoder_resolves, keep_known
    from tvbasis.io import parse_dtype

    for flag, on in (("--negate", args.negate), ("--combine", args.combine), ("--per-task", args.per_task),
                     ("--control", args.control)):
        if on:
            raise ConfigError(f"{flag} does not apply to --method atlas (it learns its own coefficients)")
    components = store_components(store) if store is not None else dict(vectors)
    if store is None and args.add not in (None, "all"):
        keep = [t for t in args.add.split(",") if t]
        missing = [t for t in keep if t not in components]
        if missing:
            raise ConfigError(f"--add: no task vector named {missing[0]!r}; the task vectors are "
                              f"{', '.join(components)}")
        components = {t: components[t] for t in keep}
    known = encoder_resolves(encoder)
    states = {c: keep_known(tv.to_state_dict(), known, c) for c, tv in components.items()}
    settings = AtlasSettings(objective=args.objective, blockwise=not args.scalar, epochs=args.epochs,
                             lr=args.atlas_lr, max_length=args.max_length, seed=0)
    if args.apply_coefficients:
        given = load_coefficients(args.apply_coefficients)
        coefs = {c: {k: v for k, v in given.get(c, {}).items()} for c in components}
        result = None
    else:
        result = learn_coefficients(encoder, states, tasks, settings, split="dev", progress=progress)
        coefs = component_coefficients(result, components, encoder)
    edit = atlas_vector(components, coefs)
    delta = keep_known(edit.to_state_dict(), known, "the aTLAS edit")
    dev = {}
    test = {}
    from tvbasis.eval.metrics import Evaluator

    ev = Evaluator(encoder, tasks, splits=("dev", "test") if report else ("dev",), progress=False)
    zs_dev = ev.zero_shot("dev")
    dev = ev.with_delta(delta, 1.0, "dev")
    zs_test = ev.zero_shot("test") if report else {}
    test = ev.with_delta(delta, 1.0, "test") if report else {}
    encoder.reset()
    means = {c: (sum(v.values()) / len(v) if v else 0.0) for c, v in coefs.items()}
    print("aTLAS over " + ("the store's bases" if store is not None else "the task vectors") + ": mean coefficient "
          + ", ".join(f"{c}={m:.3g}" for c, m in means.items()))
    for t in dev:
        line = f"  {t}: dev {100 * zs_dev[t]:.1f} % -> {100 * dev[t]:.1f} %"
        if report:
            line += f", test {100 * zs_test[t]:.1f} % -> {100 * test[t]:.1f} %"
        print(line)
    inputs = [str(args.pretrained), *(p for p in (args.json, args.out) if p)]
    if args.save_coefficients:
        if result is None:
            raise ConfigError("--save-coefficients needs learned coefficients (not --apply-coefficients)")
        save_coefficients(args.save_coefficients, result, {"pretrained": str(args.pretrained),
                                                           "source": str(args.store) if store else "fine-tunes"},
                          force=args.force, inputs=inputs)
        print(f"wrote {args.save_coefficients}")
    written = None
    if args.out:
        written = edit.apply_to(pre, 1.0, args.out, dtype=parse_dtype(args.dtype), max_shard_size=args.max_shard_size,
                                force=args.force, run=RunOptions(progress=progress), method="tvbasis tune (atlas)",
                                parameters={"mean_coefficients": means})
        print(f"wrote {written}")
    if args.json:
        data = {"pretrained": str(args.pretrained), "source": str(args.store) if store else "fine-tunes",
                "edit": "atlas", "mean_coefficients": means, "dev": dev, "pretrained_dev": zs_dev,
                "test": test or None, "pretrained_test": zs_test or None,
                "atlas": result.to_dict() if result is not None else {"applied": str(args.apply_coefficients)},
                "out": str(written) if written else None}
        with atomic_output(Path(args.json), args.force, [str(args.pretrained)], directory=False) as tmp:
            tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return 0

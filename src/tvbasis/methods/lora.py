"""LoRA stores as store methods: ``lora-factors`` (every adapter's own factors as low-rank entries) and
``lora-joint`` (shared per-tensor bases with per-adapter cores), both built in factor space from PEFT adapter
directories (builder ``factor-space``: ``store.lora_factor_space``). Every option is recorded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tvbasis.codecs import parse_codec
from tvbasis.compress import Coder
from tvbasis.errors import ConfigError
from tvbasis.methods.registry import (
    ADD,
    FACTOR_SPACE,
    JOINT,
    StoredFacts,
    StoreMethod,
    StorePlan,
    register,
    zero_fit,
)

#: core forms of a lora-joint store (``diagonal`` is ``tvbasis.lora.joint``'s ``diag``)
LORA_CORES = ("full", "diagonal")
LORA_AFFINITIES = ("cosine", "subspace")
_WHY = "builds from LoRA adapters in factor space"


def _int(v: Any, what: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{what} must be an integer >= {lo}, got {v!r}")
    return v


class LoraStoreMethod(StoreMethod):
    """A store of LoRA adapters kept in factor space (M = 0, every task as coded entries)."""

    builder = FACTOR_SPACE
    flags_refused_because = _WHY

    def plan(
        self,
        options: Mapping[str, Any],
        tasks: Sequence[str],
        M: int | None = None,
        residual: str | Coder | None = None,
        codec: str | None = None,
        layerwise: bool = False,
    ) -> StorePlan:
        return StorePlan(
            options=dict(options), task_like=False, M=0, fit=zero_fit, mode=self.coded_modes[0], factor_space=True
        )

    def problem(self, facts: StoredFacts) -> tuple[str, str] | None:
        want = self.coded_modes[0]
        if facts.M != 0 or facts.mode != want or facts.bases_coded:
            return "coded", (
                f"of a {self.name} store must be per-task entries of mode {want!r} with M = 0 and no coded bases"
            )
        return None

    def check(self, options: Mapping[str, Any], tasks: Sequence[str] | None = None) -> dict[str, Any]:
        """Every key is required in a manifest (a store records them all); ``complete`` fills the defaults of a
        build's options first."""
        opts = dict(options)
        if set(opts) != set(self.defaults):
            raise ConfigError(
                f"--method {self.name}: options must be exactly {sorted(self.defaults)}, got {sorted(opts)}"
            )
        return self.validate(opts)

    def complete(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """A build's options with the defaults filled in, checked."""
        return self.check({**self.defaults, **options})

    def validate(self, opts: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class LoraFactors(LoraStoreMethod):
    name = "lora-factors"
    summary = "every LoRA adapter's own factors as low-rank entries (--factor-codec to code them)"
    defaults = {"factor_codec": None}
    flags = frozenset({"factor_codec"})
    coded_modes = (ADD,)

    def validate(self, opts: dict[str, Any]) -> dict[str, Any]:
        fc = opts["factor_codec"]
        if fc is not None and not isinstance(fc, str):
            raise ConfigError(f"--method lora-factors: factor_codec must be a codec spec or null, got {fc!r}")
        if fc is not None:
            parse_codec(fc)  # ConfigError naming what is wrong
        return opts


class LoraJoint(LoraStoreMethod):
    name = "lora-joint"
    summary = "LoRA adapters as shared per-tensor bases U, V and per-adapter cores (-k K)"
    defaults = {"k": None, "cores": "full", "clusters": 1, "affinity": "cosine", "refine": 0, "iters": None}
    choices = {"cores": LORA_CORES, "affinity": LORA_AFFINITIES}
    flags = frozenset({"k", "cores", "clusters", "affinity", "refine"})
    coded_modes = (JOINT,)

    def validate(self, opts: dict[str, Any]) -> dict[str, Any]:
        k = opts["k"]
        if k is None:
            raise ConfigError("method joint needs k, the size of the shared bases (-k K)")
        ks = [k] if isinstance(k, int) and not isinstance(k, bool) else k
        if not isinstance(ks, list) or len(ks) not in (1, 2):
            raise ConfigError(f"--method lora-joint: k must be an integer or [k_out, k_in], got {k!r}")
        for x in ks:
            _int(x, "--method lora-joint: k", 1)
        if opts["cores"] not in LORA_CORES:
            raise ConfigError(f"--method lora-joint: cores must be one of {LORA_CORES}, got {opts['cores']!r}")
        if len(ks) == 2 and opts["cores"] != "full":
            raise ConfigError("--method lora-joint: k = [k_out, k_in] needs full cores")
        if opts["affinity"] not in LORA_AFFINITIES:
            raise ConfigError(
                f"--method lora-joint: affinity must be one of {LORA_AFFINITIES}, got {opts['affinity']!r}"
            )
        _int(opts["clusters"], "--method lora-joint: clusters", 1)
        _int(opts["refine"], "--method lora-joint: refine", 0)
        if opts["iters"] is not None:
            _int(opts["iters"], "--method lora-joint: iters", 0)
        return opts

    def cluster_count(self, options: Mapping[str, Any], M: int) -> tuple[int, str]:
        return int(options["clusters"]), "options.clusters"

    def requires_clusters(self) -> bool:
        return True


register(LoraFactors())
register(LoraJoint())

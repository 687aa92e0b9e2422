"""Configuration of the monitor hook: one dataclass, validated once, with named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from monitor import patterns

PRESETS = ("cheap", "default", "full")


@dataclass(frozen=True)
class MonitorConfig:
    """When and what the hook computes. Steps are optimizer steps, counted from 0.

    A step ``t`` is logged when ``t % every == 0``. SJE and the NTK eigenvalue cost more
    than the other metrics (a top-k SVD; per-sample kernels), so by default they run on
    every 4th logged step. ``MonitorConfig.preset("full")`` computes everything at every
    logged step; ``"cheap"`` turns SJE and NTK off.
    """

    every: int = 50  # log the cheap metrics every `every` optimizer steps
    sje_every: int = 200  # SJE every `sje_every` steps (a multiple of `every`; 0: off)
    ntk_every: int = 200  # NTK top eigenvalue every `ntk_every` steps (multiple of `every`; 0: off)
    ntk_probe: int = 16  # n: samples of the batch used for the per-layer NTK; an NTK step holds
    #                      about n * T * (d_in + d_out) values per layer (see README, Memory)
    ntk_max_mb: float = 4096.0  # cap on the memory one NTK step's captures hold; layers past
    #                             it are skipped and said once (0: no cap)
    sje_k_max: int = 64  # cap on k = floor(stable rank) for SJE's top-k subspace (logged)
    power_iters: int = 60  # cap on Lanczos steps for sigma_max per logged step (an estimate
    #                        that misses power_tol is not logged: health/sigma_unconverged)
    power_tol: float = 2e-3  # stop when the relative residual ||M^T u - sigma v|| / sigma is
    #                          below this: it bounds the relative error of sigma_max (SPEC 6)
    layers: str = ".*"  # regex on parameter names: which tensors get per-layer metrics
    log_system: bool = True  # write run.json (status, layer order) for the dashboard
    warn_overhead: float = 0.1  # warn once when the monitor takes more than this share of
    #                             wall time between two logged steps (0: never warn)
    dist_timeout_s: float = 300.0  # torch.distributed: seconds a collective of the monitor
    #                                waits for the other ranks (a dead rank cannot hang it)
    sharded_sigma: str = "auto"  # FSDP2 sigma_max: "power" (iteration on the shards),
    #                              "gather" (whole matrix on its owner rank), "auto" (gather
    #                              while a rank receives <= 1 GB per logged step)

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"MonitorConfig.{name}={getattr(self, name)!r}: expected {allowed}")

        if not _pos_int(self.every):
            raise bad("every", "an integer >= 1")
        for name in ("sje_every", "ntk_every"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0 and value % self.every == 0):
                raise bad(name, f"0 (off) or a positive multiple of every={self.every}")
        if not _pos_int(self.ntk_probe) or self.ntk_probe < 2:
            raise bad("ntk_probe", "an integer >= 2")
        if not (isinstance(self.ntk_max_mb, (int, float)) and not isinstance(self.ntk_max_mb, bool)
                and self.ntk_max_mb >= 0):
            raise bad("ntk_max_mb", "a number of megabytes >= 0 (0: no cap)")
        for name in ("sje_k_max", "power_iters"):
            if not _pos_int(getattr(self, name)):
                raise bad(name, "an integer >= 1")
        if not (isinstance(self.power_tol, float) and 0 < self.power_tol < 1):
            raise bad("power_tol", "a float in (0, 1)")
        if not (isinstance(self.warn_overhead, (int, float)) and not isinstance(self.warn_overhead, bool)
                and 0 <= self.warn_overhead):
            raise bad("warn_overhead", "a number >= 0 (0: never warn)")
        if self.sharded_sigma not in ("auto", "power", "gather"):
            raise bad("sharded_sigma", "'auto', 'power' or 'gather'")
        if not (isinstance(self.dist_timeout_s, (int, float)) and not isinstance(self.dist_timeout_s, bool)
                and self.dist_timeout_s > 0):
            raise bad("dist_timeout_s", "a number of seconds > 0")
        if (why := patterns.problem(self.layers)) is not None:
            raise bad("layers", f"a valid regular expression ({why})")

    @classmethod
    def preset(cls, name: str, every: int = 50, **overrides: Any) -> "MonitorConfig":
        """Named presets: ``cheap`` (no SJE/NTK), ``default``, ``full`` (all metrics each log)."""
        if name == "cheap":
            base = cls(every=every, sje_every=0, ntk_every=0)
        elif name == "default":
            base = cls(every=every, sje_every=4 * every, ntk_every=4 * every)
        elif name == "full":
            base = cls(every=every, sje_every=every, ntk_every=every)
        else:
            raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def logs(self, step: int) -> bool:
        return step % self.every == 0

    def sje_at(self, step: int) -> bool:
        return self.sje_every > 0 and step % self.sje_every == 0

    def ntk_at(self, step: int) -> bool:
        return self.ntk_every > 0 and step % self.ntk_every == 0


def _pos_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1

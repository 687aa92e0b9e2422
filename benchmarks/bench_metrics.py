"""Cost of the metric functions against the slow references they replace.

    python -m benchmarks.bench_metrics [--quick]

- sigma_max: warm-started power iteration vs ``torch.linalg.svdvals``;
- top-k triplets for SJE: ``top_k_svd`` (float64 Gram eigh / randomized) vs ``torch.linalg.svd``;
- NTK: Gram from captured inputs and output gradients vs explicit per-sample gradients with
  ``vmap(grad)`` (which also needs an extra forward and backward).
Writes benchmarks/results/metrics.md.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from benchmarks.common import best_time, md_table, write_results
from monitor.metrics import spectral
from monitor.metrics.ntk import cosine_top_eig
from monitor.metrics.ntk_capture import NTKCapture


def timed(fn, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` runs, in milliseconds."""
    return 1e3 * best_time(fn, repeat)


def spectral_rows(shapes: list[tuple[int, int]]) -> list[list[object]]:
    rows = []
    for m, n in shapes:
        M = torch.randn(m, n) / n ** 0.5 + 0.3 * torch.randn(m, 1) @ torch.randn(1, n) / n ** 0.5
        cold = spectral.power_sigma_max(M)
        M2 = M + 1e-3 * torch.randn_like(M) / n ** 0.5  # the weights one logged step later
        warm = spectral.power_sigma_max(M2, cold.v)
        rows.append([f"{m}x{n}",
                     f"{timed(lambda: spectral.power_sigma_max(M2, cold.v)):.1f} ({warm.iters} it)",
                     f"{timed(lambda: spectral.power_sigma_max(M2)):.1f}",
                     f"{timed(lambda: torch.linalg.svdvals(M2), 1):.1f}",
                     f"{timed(lambda: spectral.top_k_svd(M2, 16)):.1f}",
                     f"{timed(lambda: torch.linalg.svd(M2, full_matrices=False), 1):.1f}"])
    return rows


def ntk_rows(n: int, T: int, d: int) -> list[list[object]]:
    model = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
    x, y = torch.randn(2 * n, T, d), torch.randn(2 * n, T, d)
    names = {id(p): k for k, p in model.named_parameters() if p.ndim >= 2}
    cap = NTKCapture(model, names, n=n)

    def hooks() -> None:
        cap.arm()
        (model(x) - y).pow(2).mean().backward()
        cap.compute()
        cap.disarm()

    def plain() -> None:
        (model(x) - y).pow(2).mean().backward()

    params = {k: v.detach() for k, v in model.named_parameters()}

    def explicit() -> None:
        loss = lambda p, xi, yi: (functional_call(model, p, (xi[None],)) - yi[None]).pow(2).mean()  # noqa: E731
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x[:n], y[:n])
        for k in names.values():
            gk = g[k].reshape(n, -1)
            cosine_top_eig(gk @ gk.t())

    return [[f"n={n}, T={T}, d={d}", f"{timed(plain):.1f}", f"{timed(hooks):.1f}",
             f"{timed(explicit):.1f}"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = [(256, 256), (512, 2048)] if args.quick else [(256, 256), (512, 2048), (768, 3072)]
    body = "## sigma_max and top-k (ms)\n\n" + md_table(
        ["matrix", "power, warm", "power, cold", "svdvals", "top_k_svd(k=16)", "full svd"],
        spectral_rows(shapes))
    sizes = [(8, 32, 64)] if args.quick else [(8, 32, 64), (16, 128, 128)]
    rows = [r for s in sizes for r in ntk_rows(*s)]
    body += "\n## NTK, two Linear layers (ms)\n\n" + md_table(
        ["probe", "step without NTK", "step with hooks + Gram", "vmap(grad) reference"], rows)
    write_results("benchmarks/results/metrics.md", "Metric functions vs references", body)


if __name__ == "__main__":
    main()

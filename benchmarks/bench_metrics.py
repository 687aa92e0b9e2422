"""Cost of the metric functions against the slow references they replace.

    python -m benchmarks.bench_metrics [--quick]

- sigma_max accuracy on random-init (Marchenko-Pastur) spectra, cold and warm, against
  float64 ``svdvals``, and its cost against ``svdvals`` side by side;
- sigma_max: warm-started Lanczos vs ``torch.linalg.svdvals``;
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


def init_matrix(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    """Random-init matrices: Marchenko-Pastur spectra with a nearly flat top (Gaussian,
    nn.Linear's uniform Kaiming), or a trained-like matrix with a large top gap."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian (MP)":
        return torch.randn(n, n, generator=gen) / n ** 0.5
    if kind == "kaiming uniform (MP)":
        bound = 1 / n ** 0.5  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        return (torch.rand(n, n, generator=gen) * 2 - 1) * bound
    M = torch.randn(n, n, generator=gen) / n ** 0.5
    return M + 3.0 * torch.outer(torch.randn(n, generator=gen), torch.randn(n, generator=gen)) / n


def accuracy_rows(sizes: list[int], kinds: list[str]) -> list[list[object]]:
    """sigma_max / SR error against float64 svdvals, cold (first logged step) and warm (one
    SGD-like step later), with the time ratio to float32 svdvals measured side by side."""
    rows = []
    for n in sizes:
        for kind in kinds if n < 2048 else kinds[:1]:  # the largest: Gaussian only (time)
            M = init_matrix(kind, n)
            M2 = M - 0.05 * M.std() * torch.randn(n, n, generator=torch.Generator().manual_seed(1))
            s = torch.linalg.svdvals(M2.double())
            t_svd = timed(lambda: torch.linalg.svdvals(M2), 1)
            cold = spectral.power_sigma_max(M2)
            first = spectral.power_sigma_max(M)
            warm = spectral.power_sigma_max(M2, first.v)
            t_cold = timed(lambda: spectral.power_sigma_max(M2))
            t_warm = timed(lambda: spectral.power_sigma_max(M2, first.v))
            s1, fro2 = float(s[0]), float(s.pow(2).sum())

            def err(r):
                sr_err = abs(fro2 / r.sigma ** 2 - fro2 / s1 ** 2) / (fro2 / s1 ** 2)
                return f"{abs(r.sigma - s1) / s1:.1e} / {sr_err:.1e}"
            rows.append([f"{n}x{n}", kind, f"{float(s[1]) / s1:.4f}", f"{t_svd:.0f}",
                         f"{t_cold:.1f} ({cold.iters} it)", err(cold),
                         f"{t_warm:.1f} ({warm.iters} it)", err(warm),
                         f"**{t_svd / t_warm:.0f}x**", str(cold.converged and warm.converged)])
            print(" | ".join(map(str, rows[-1])), flush=True)  # progress on a slow machine
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
    parser.add_argument("--sizes", default="256,1024,2048,4096",
                        help="square sizes of the accuracy table (comma-separated)")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = [(256, 256), (512, 2048)] if args.quick else [(256, 256), (512, 2048), (768, 3072)]
    sizes_acc = [int(x) for x in args.sizes.split(",")]
    body = ("## sigma_max accuracy and cost, random-init (Marchenko-Pastur) spectra\n\n"
            "Lanczos with the residual rule (power_tol 2e-3, the default), cold (first logged "
            "step) and warm (from the previous step's vector) on the matrix one SGD-like step "
            "later; errors against float64 `svdvals`; times in ms, best of 3; svdvals float32.\n\n"
            + md_table(["matrix", "init", "s2/s1", "svdvals ms", "cold ms", "cold err sigma / SR",
                        "warm ms", "warm err sigma / SR", "svdvals / warm", "converged"],
                       accuracy_rows(sizes_acc, ["gaussian (MP)", "kaiming uniform (MP)",
                                                 "trained, large top gap"])))
    body += "\n## sigma_max and top-k (ms)\n\n" + md_table(
        ["matrix", "power, warm", "power, cold", "svdvals", "top_k_svd(k=16)", "full svd"],
        spectral_rows(shapes))
    sizes = [(8, 32, 64)] if args.quick else [(8, 32, 64), (16, 128, 128)]
    rows = [r for s in sizes for r in ntk_rows(*s)]
    body += "\n## NTK, two Linear layers (ms)\n\n" + md_table(
        ["probe", "step without NTK", "step with hooks + Gram", "vmap(grad) reference"], rows)
    write_results("benchmarks/results/metrics.md", "Metric functions vs references", body)


if __name__ == "__main__":
    main()

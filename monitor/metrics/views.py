"""Which tensors are layers, and their matrix views (SPEC section 1).

Spectral metrics act on a 2-D float32 view ``M(W)`` of each weight:

| kind          | weight shape            | matrix view                    |
| ------------- | ----------------------- | ------------------------------ |
| ``linear``    | (out, in)               | as is                          |
| ``conv1d_hf`` | (in, out) (HF Conv1D)   | transposed to (out, in)        |
| ``conv``      | (out, in/groups, *k)    | (out, in/groups * prod(k))     |
| ``embedding`` | (num, dim)              | as is                          |
| ``mha_in_proj`` | (3d, d)               | as is                          |
| ``other``, ndim >= 2 | (d0, d1, ...)    | (d0, prod(rest))               |

Tensors with ndim < 2 (biases, norm gains) have no matrix view.
"""

from __future__ import annotations

import torch
from torch import nn

KINDS: tuple[str, ...] = ("linear", "conv1d_hf", "conv", "embedding", "mha_in_proj", "other")


def module_kind(module: nn.Module) -> str:
    """Kind of a module's ``weight`` (``other`` when the module is not one we know).

    Hugging Face's ``Conv1D`` is recognised by class name, so transformers is never imported.
    """
    if type(module).__name__ == "Conv1D" and not isinstance(module, nn.Conv1d):
        return "conv1d_hf"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "other"


def layer_kinds(model: nn.Module) -> dict[str, str]:
    """Map every ``named_parameters()`` name to its kind (one of :data:`KINDS`).

    Tied parameters appear once, under their first name, with the kind of the first module
    (in ``model.modules()`` order) that owns them as its weight: GPT-2's ``wte`` / ``lm_head``
    pair is an ``embedding``. Biases and any other tensor are ``other``.
    """
    kind_of: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            weight = getattr(module, "in_proj_weight", None)
            if isinstance(weight, torch.Tensor):
                kind_of.setdefault(id(weight), "mha_in_proj")
            continue
        weight = module._parameters.get("weight")
        if weight is not None:
            kind = module_kind(module)
            if kind != "other":
                kind_of.setdefault(id(weight), kind)
    return {name: kind_of.get(id(p), "other") for name, p in model.named_parameters()}


def has_matrix_view(weight: torch.Tensor) -> bool:
    """True when ``weight`` has spectral metrics (ndim >= 2, no zero-sized dimension)."""
    return weight.ndim >= 2 and weight.numel() > 0


def matrix_view(weight: torch.Tensor, kind: str = "other") -> torch.Tensor:
    """The 2-D float32 matrix view of ``weight`` (table in the module docstring).

    Works for a gradient as well as a weight (same shape, same view); a sparse gradient
    (``nn.Embedding(sparse=True)``) is densified, as the matrix functions need it dense.
    Raises ValueError for tensors without a matrix view and for unknown kinds.
    """
    if kind not in KINDS:
        raise ValueError(f"matrix_view(kind={kind!r}): expected one of {KINDS}")
    if not has_matrix_view(weight):
        raise ValueError(f"matrix_view: a tensor of shape {tuple(weight.shape)} has no matrix "
                         "view (needs ndim >= 2 and no empty dimension)")
    w = weight.detach()
    if w.layout != torch.strided:
        w = w.to_dense()
    if kind == "conv1d_hf":
        if w.ndim != 2:
            raise ValueError(f"matrix_view: a Conv1D weight must be 2-D, got {tuple(w.shape)}")
        w = w.t()  # (in, out) -> (out, in)
    elif w.ndim > 2:
        w = w.reshape(w.shape[0], -1)  # (d0, prod(rest)); conv: (out, in/groups * prod(k))
    return w.to(torch.float32)

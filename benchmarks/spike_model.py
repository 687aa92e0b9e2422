"""The testbeds' model: a small GPT that exposes the literature's instability signals.

Used by the spike testbed (``benchmarks/spike_testbed.py``) and the PSS trial
(``benchmarks/pss_testbed.py``).

Like ``demos/model.py`` (after nanoGPT) but with explicit attention so that the largest
attention logit can be read (Wortsman et al. 2023, "Small-scale proxies for large-scale
Transformer training instabilities": attention-logit growth and output-logit divergence are
the two instabilities a small model shows at high learning rate), and the two fixes that
paper studies as switches: QK-layernorm and the z-loss ``1e-4 * mean(log Z)^2``.
No weight tying, so the output layer is a matrix of its own.

``post_ln`` switches the residual blocks from pre-LN ``x + f(LN(x))`` to the original
Transformer's post-LN ``LN(x + f(x))`` (no final LayerNorm: the last block's output is
already normalised). Xiong et al. 2020 ("On Layer Normalization in the Transformer
Architecture") show post-LN's gradients near the output are large at initialisation, so it
diverges at moderate LR without a warm-up: a natural instability near the optimal LR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class SpikeGPTConfig:
    vocab_size: int = 128
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    qk_norm: bool = False  # LayerNorm on queries and keys (Wortsman et al.'s fix)
    z_loss: float = 0.0  # weight of mean(log Z)^2 added to the loss (1e-4 in the paper)
    post_ln: bool = False  # LN(x + f(x)) blocks (Vaswani et al.) instead of x + f(LN(x))


class Attention(nn.Module):
    def __init__(self, cfg: SpikeGPTConfig) -> None:
        super().__init__()
        self.n_head, hs = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.q_ln = nn.LayerNorm(hs) if cfg.qk_norm else nn.Identity()
        self.k_ln = nn.LayerNorm(hs) if cfg.qk_norm else nn.Identity()
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool))
        self.register_buffer("mask", mask, persistent=False)
        self.max_logit = 0.0  # largest attention logit |q.k|/sqrt(hs) of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = self.q_ln(q), self.k_ln(k)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (k.size(-1) ** -0.5)  # (B, nh, T, T)
        causal = self.mask[:T, :T]
        self.max_logit = float(att.detach().abs().masked_fill(~causal, 0.0).amax())
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, cfg: SpikeGPTConfig) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.fc_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.post_ln = cfg.post_ln

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_ln:  # normalise after the residual sum
            x = self.ln_1(x + self.attn(x))
            return self.ln_2(x + self.fc_proj(F.gelu(self.fc(x))))
        x = x + self.attn(self.ln_1(x))  # pre-LN residual blocks
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


class SpikeGPT(nn.Module):
    def __init__(self, cfg: SpikeGPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.Identity() if cfg.post_ln else nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                std = 0.02 / (2 * cfg.n_layer) ** 0.5 if name.endswith(("proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
        self.logz_rms = 0.0  # sqrt(mean (log Z)^2) of the output softmax, last forward

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        """Returns ``(cross-entropy, loss to optimise)``; the second adds the z-loss."""
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        logz = torch.logsumexp(logits, dim=-1)  # (B, T)
        zsq = logz.pow(2).mean()
        self.logz_rms = float(zsq.detach().sqrt())
        return ce, ce + self.cfg.z_loss * zsq if self.cfg.z_loss else ce

    def attention_logits(self) -> dict[str, float]:
        return {f"blocks.{i}.attn": b.attn.max_logit for i, b in enumerate(self.blocks)}

"""The GPT. One file, readable top to bottom, in the style of nanoGPT/nanochat.

Defaults are Llama-shaped (RoPE, RMSNorm, SwiGLU, no biases, tied embeddings); the same code also
expresses GPT-2 (learned positions, LayerNorm, GELU, biases) so both can be imported and exported
exactly. Attention is torch's `scaled_dot_product_attention`, with optional grouped-query attention
and a KV cache for generation.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lathe.config import ModelConfig


def mlp_hidden_size(cfg: ModelConfig) -> int:
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    if cfg.mlp == "gelu":
        return 4 * cfg.n_embd
    # SwiGLU has three matrices: 8/3 * n_embd keeps the parameter count of a 4x GELU MLP
    return 64 * math.ceil(8 * cfg.n_embd / 3 / 64)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
    return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)


# --- rotary position embeddings -------------------------------------------------------------
def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # the "rotate half" layout used by Llama / HF
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B or 1, 1, T, D) for the positions of x."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# --- KV cache ---------------------------------------------------------------------------------
class KVCache:
    """Preallocated keys/values per layer. All rows share one write position; rows that started
    with left padding mask their pad slots out through `key_mask`."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        head_dim = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head or cfg.n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len
        self.key_mask: torch.Tensor | None = None  # (B, max_len) bool, True = real token

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.size(2)
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {t} > {self.max_len} tokens")
        self.k[layer, :, :, self.pos : self.pos + t] = k
        self.v[layer, :, :, self.pos : self.pos + t] = v
        end = self.pos + t
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        self.pos += t

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep, drop or repeat batch rows by index (finished rows leave; samples share a prefill)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)

    def repeat_rows(self, n: int) -> None:
        """Duplicate each row n times: several samples share one prefill."""
        self.select_rows(torch.arange(self.k.size(1), device=self.k.device).repeat_interleave(n))


# --- the transformer --------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, self.n_head * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=cfg.bias)
        self.use_rope = cfg.pos_emb == "rope"
        self.dropout = cfg.dropout

    def forward(self, x, rope, cache: KVCache | None, mask: torch.Tensor | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if self.n_kv_head != self.n_head:  # grouped-query attention: share each k/v head
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden_size(cfg)
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, cache, mask):
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache, mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (it comes from the tokenizer)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_emb == "learned":
            self.pos_embed = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.final_norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 style: scale the residual projections down by depth so the residual stream stays O(1)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def hidden_states(self, idx, cache: KVCache | None = None, positions=None):
        """The final-norm hidden states (B, T, C); heads (LM, classifier, reward) sit on top."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if positions is None:
            if start + T > self.cfg.block_size:  # checked on the host: no device sync per step
                raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
            positions = torch.arange(start, start + T, device=idx.device).unsqueeze(0)
        x = self.embed(idx)
        if self.cfg.pos_emb == "learned":
            x = x + self.pos_embed(positions)
        x = self.drop(x)
        rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))
        mask = self._attention_mask(T, cache, idx.device)
        for block in self.blocks:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.advance(T)
        return self.final_norm(x)

    @staticmethod
    def _attention_mask(T: int, cache: KVCache | None, device) -> torch.Tensor | None:
        """None means plain causal attention; with a cache, queries see every key up to themselves."""
        if cache is None or (cache.pos == 0 and cache.key_mask is None):
            return None
        if T == 1 and cache.key_mask is None:
            return None  # one new token sees every cached key: no mask to build per step
        n_keys = cache.pos + T
        q_pos = torch.arange(cache.pos, n_keys, device=device).unsqueeze(1)
        mask = torch.arange(n_keys, device=device).unsqueeze(0) <= q_pos  # (T, n_keys)
        mask = mask.unsqueeze(0).unsqueeze(0)
        if cache.key_mask is not None:
            mask = mask & cache.key_mask[:, None, None, :n_keys]
        return mask

    def forward(self, idx, targets=None, cache: KVCache | None = None, positions=None, loss_mask=None):
        """Logits (B, T, V); with targets also the mean cross-entropy over positions where
        targets != -100 (and loss_mask is true, if given)."""
        h = self.hidden_states(idx, cache, positions)
        if targets is None:
            return self.lm_head(h), None
        logits = self.lm_head(h)
        if loss_mask is not None:
            targets = targets.masked_fill(~loss_mask.bool(), -100)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def make_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.cfg, batch_size, max_len or self.cfg.block_size, p.device, p.dtype)

"""Training throughput: lathe's GPT beside a plain nanoGPT-style reference of the same shape.

Both models have the same architecture (RoPE, RMSNorm, SwiGLU, tied embeddings, no biases), the
same parameter count, the same batches and the same AdamW step. Trials alternate between the two
so machine noise hits both alike; the median tokens/s of each and their ratio are printed.

    python bench/train_throughput.py                 # the default recipe's shape, on CPU
    python bench/train_throughput.py --device cuda --dtype bfloat16 --n-layer 12 --n-embd 768 --block 1024
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lathe.config import ModelConfig
from lathe.model import GPT


# --- the reference: nanoGPT's layout, with the same RoPE/RMSNorm/SwiGLU choices ------------------
class RefAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RefMLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.c_fc = nn.Linear(d, 2 * hidden, bias=False)
        self.c_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)


class RefBlock(nn.Module):
    def __init__(self, d, h, hidden):
        super().__init__()
        self.ln_1, self.attn = nn.RMSNorm(d), RefAttention(d, h)
        self.ln_2, self.mlp = nn.RMSNorm(d), RefMLP(d, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    def __init__(self, vocab, n_layer, n_head, d, hidden, block):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(RefBlock(d, n_head, hidden) for _ in range(n_layer))
        self.ln_f = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        hd = d // n_head
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(block).float(), inv)
        ang = torch.cat([ang, ang], -1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, idx, targets):
        T = idx.size(1)
        x = self.wte(idx)
        for block in self.h:
            x = block(x, self.cos[:T], self.sin[:T])
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


# --- measurement -----------------------------------------------------------------------------
def make_step(model, lr=1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=next(model.parameters()).is_cuda)

    def step(x, y, autocast):
        with autocast:
            _, loss = model(x, targets=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="steps per trial")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()

    device = torch.device(args.device)
    cfg = ModelConfig(vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                      block_size=args.block)
    torch.manual_seed(0)
    lathe_model = GPT(cfg).to(device)
    hidden = lathe_model.blocks[0].mlp.up_proj.out_features
    ref_model = RefGPT(args.vocab, args.n_layer, args.n_head, args.n_embd, hidden, args.block).to(device)
    n_lathe = sum(p.numel() for p in lathe_model.parameters())
    n_ref = sum(p.numel() for p in ref_model.parameters())
    assert n_lathe == n_ref, (n_lathe, n_ref)
    models = {"lathe": lathe_model, "reference": ref_model}
    if args.compile:
        models = {k: torch.compile(m) for k, m in models.items()}
    steps = {k: make_step(m) for k, m in models.items()}
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())
    x = torch.randint(0, args.vocab, (args.batch, args.block), device=device)
    y = torch.randint(0, args.vocab, (args.batch, args.block), device=device)
    for step in steps.values():  # warm-up (and compilation)
        for _ in range(3):
            step(x, y, autocast)
    sync(device)

    rates = {k: [] for k in steps}
    for _ in range(args.trials):
        for name, step in steps.items():  # alternate so drift in machine speed hits both
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(x, y, autocast)
            sync(device)
            rates[name].append(args.steps * x.numel() / (time.perf_counter() - t0))

    print(f"shape: {args.n_layer} layers, {args.n_embd} wide, {args.n_head} heads, context {args.block}, "
          f"vocab {args.vocab}, batch {args.batch}; {n_lathe:,} parameters; {args.device} {args.dtype}"
          f"{' compiled' if args.compile else ''}; torch threads {torch.get_num_threads()}")
    for name, r in rates.items():
        print(f"{name:10s} median {statistics.median(r):10,.0f} tokens/s   (trials: {', '.join(f'{v:,.0f}' for v in r)})")
    ratio = statistics.median(rates["lathe"]) / statistics.median(rates["reference"])
    print(f"ratio lathe/reference: {ratio:.3f}  ({'not slower' if ratio >= 0.97 else 'SLOWER'}; "
          f"within 3% counts as equal)")


if __name__ == "__main__":
    main()

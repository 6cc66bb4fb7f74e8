"""A tiny training run used by the resume and torchrun tests (run as a script, also under torchrun)."""

import argparse
import os
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_model

from lathe.config import ModelConfig, TrainConfig
from lathe.eval.perplexity import evaluate_lm
from lathe.model import GPT
from lathe.train.batches import random_windows
from lathe.train.dist import teardown_distributed
from lathe.train.loop import train

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--accum", type=int, default=1)
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--kill-at-batch", type=int, default=-1, help="SIGKILL this process when it asks for batch i")
parser.add_argument("--resume", action="store_true")
parser.add_argument("--dropout", type=float, default=0.1)
args = parser.parse_args()

torch.manual_seed(0)
vocab = 97
tokens = (np.arange(20_000) * 7 % vocab).astype(np.uint16)  # a learnable, deterministic stream
model = GPT(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=args.dropout))
cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch, grad_accum=args.accum, lr=3e-3, warmup_steps=3,
                  eval_every=10, checkpoint_every=5, log_every=5, device="cpu", keep_checkpoints=2)
batches = random_windows(tokens, 32, args.batch, seed=1)


def get_batch(i):
    if i == args.kill_at_batch:
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill in the middle of a step
    return batches(i)


def evaluate(m):
    return {f"val_{k}": v for k, v in evaluate_lm(m, tokens[:2048], np.ones(vocab), 1024).items()}


result = train(model, cfg, get_batch, evaluate, args.out, resume=args.resume)
if int(os.environ.get("RANK", "0")) == 0:
    save_model(model, str(args.out / "final.safetensors"))
teardown_distributed()

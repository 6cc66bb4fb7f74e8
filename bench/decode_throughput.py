"""Decode throughput: lathe's Engine beside `transformers` generate() on the same model, in one run.

One random-weight lathe model of the default recipe's shape (or --n-layer/--n-embd/...) is exported
with `lathe.interop.hf.export_hf` and loaded back with `AutoModelForCausalLM`; its logits are
checked against lathe's before anything is timed. Both then decode the same prompts (left-padded
batches of different lengths), greedily, for the same number of new tokens (end tokens ignored, so
every row writes exactly --new-tokens), with a KV cache (`use_cache=True` for transformers). Trials
alternate between the two so machine noise hits both alike; the median tokens/s of each and the
ratio lathe / transformers are printed for batch 1 and batch 8. Time includes the prefill, and for
lathe also the text decoding of every token.

    python bench/decode_throughput.py                       # default recipe shape, CPU
    python bench/decode_throughput.py --threads 1 --trials 5
    python bench/decode_throughput.py --device cuda --n-layer 12 --n-embd 768 --block 1024 --vocab 16384
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from lathe.config import TokenizerConfig, load_recipe
from lathe.interop.hf import export_hf
from lathe.model import GPT
from lathe.serve.engine import Engine, Request
from lathe.tokenizer import train_tokenizer


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--block", type=int)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def corpus(max_bytes: int = 1_500_000) -> list[str]:
    """Python standard library sources: the default recipe's text, for a realistic tokenizer."""
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def build(args):
    texts = corpus()
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=args.vocab))
    shape = {k: v for k, v in {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                               "block_size": args.block}.items() if v is not None}
    cfg = load_recipe("default", {f"model.{k}": v for k, v in shape.items()}).model
    torch.manual_seed(0)
    lathe_model = GPT(cfg.model_copy(update={"vocab_size": tok.vocab_size})).eval().to(args.device)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="lathe-bench-hf-") as folder:
        export_hf(lathe_model.cpu(), tok, folder)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(args.device)
    lathe_model.to(args.device)
    hf_model.generation_config.eos_token_id = None  # every row writes exactly --new-tokens, as lathe's do
    hf_model.generation_config.pad_token_id = tok.pad_id
    return tok, lathe_model, hf_model, texts


def prompts_of(tok, texts: list[str], n: int, block: int, new_tokens: int) -> list[list[int]]:
    """n prompts of different lengths (24..) that leave room for new_tokens in the context."""
    longest = max(8, min(64, block - new_tokens - 1))
    out = []
    for i in range(n):
        ids = tok.encode(texts[(7 * i + 3) % len(texts)][:4000])
        out.append([tok.bos_id] + ids[: max(4, longest - 5 * i) - 1])
    return out


def check_same_model(lathe_model, hf_model, prompts) -> float:
    ids = torch.tensor([prompts[0]], device=lathe_model.lm_head.weight.device)
    with torch.inference_mode():
        ours = lathe_model(ids)[0]
        theirs = hf_model(ids).logits
    return (ours - theirs).abs().max().item()


def run_lathe(engine: Engine, prompts, new_tokens) -> list[list[int]]:
    requests = [Request(prompt=p, max_tokens=new_tokens, temperature=0, ignore_eos=True) for p in prompts]
    return [r.choices[0].token_ids for r in engine.generate(requests)]


def run_hf(hf_model, prompts, new_tokens, pad_id) -> list[list[int]]:
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    device = next(hf_model.parameters()).device
    with torch.inference_mode():
        out = hf_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                do_sample=False, use_cache=True)  # no eos_token_id: exactly new_tokens
    assert out.shape[1] == longest + new_tokens
    return out[:, longest:].tolist()


def timed(fn) -> tuple[float, list]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok, lathe_model, hf_model, texts = build(args)
    engine = Engine(lathe_model, tok)
    block = lathe_model.cfg.block_size
    cfg = lathe_model.cfg
    print(f"model: {cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads, vocab {cfg.vocab_size}, "
          f"{lathe_model.num_params() / 1e6:.2f}M params; device {args.device}, {torch.get_num_threads()} threads")
    import transformers

    print(f"transformers {transformers.__version__}, torch {torch.__version__}; {args.new_tokens} new tokens per row, "
          f"greedy, median of {args.trials} alternating trials")
    print(f"{'batch':>5} {'lathe tok/s':>12} {'hf tok/s':>10} {'lathe/hf':>9} {'same tokens':>12}")
    for batch in args.batches:
        prompts = prompts_of(tok, texts, batch, block, args.new_tokens)
        if batch == args.batches[0]:
            diff = check_same_model(lathe_model, hf_model, prompts)
            assert diff < 1e-3, f"the exported model differs from lathe's: max logit difference {diff}"
        run_lathe(engine, prompts, 4), run_hf(hf_model, prompts, 4, tok.pad_id)  # warm up both
        ours, theirs = [], []
        for _ in range(args.trials):
            t, ours_out = timed(lambda: run_lathe(engine, prompts, args.new_tokens))
            ours.append(batch * args.new_tokens / t)
            t, hf_out = timed(lambda: run_hf(hf_model, prompts, args.new_tokens, tok.pad_id))
            theirs.append(batch * args.new_tokens / t)
        same = sum(a == b for a, b in zip(ours_out, hf_out))
        ours_med, theirs_med = statistics.median(ours), statistics.median(theirs)
        print(f"{batch:>5} {ours_med:>12.0f} {theirs_med:>10.0f} {ours_med / theirs_med:>8.2f}x {same:>7}/{batch}")


if __name__ == "__main__":
    main()

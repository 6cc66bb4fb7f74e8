import torch

from lathe.config import ModelConfig
from lathe.generate import filter_logits, generate, sample_next, stream_ids
from lathe.model import GPT


class CharTokenizer:
    """A byte tokenizer so generation can be tested without training a BPE."""
    bos_id, eos_id = 256, 257

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=258, n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, 2, None)).tolist() == [[True, True, False, False]]
    # nucleus 0.7: 0.5 alone is short of it, 0.5+0.3 reaches it
    assert torch.isfinite(filter_logits(logits, None, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, None, 0.5)).tolist() == [[True, False, False, False]]
    assert sample_next(logits, 0.0).item() == 0


def test_greedy_decoding_with_cache_equals_recomputing_everything():
    m = model()
    prompt = list(b"def f(x):")
    cached = [s[0] for s in stream_ids(m, prompt, 12, temperature=0)]
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(m(torch.tensor([ids]))[0][0, -1].argmax()))
    assert cached == ids[len(prompt):]


def test_seed_makes_sampling_repeatable_and_samples_differ():
    m, tok = model(), CharTokenizer()
    a = generate(m, tok, "x = ", 20, num_samples=3, temperature=1.0, seed=7)
    assert a == generate(m, tok, "x = ", 20, num_samples=3, temperature=1.0, seed=7)
    assert len(set(a)) > 1


def test_stop_strings_cut_the_output_and_context_is_bounded():
    m, tok = model(), CharTokenizer()
    full = generate(m, tok, "ab", 30, temperature=0)[0]
    stop = full[5:7]
    cut = generate(m, tok, "ab", 30, temperature=0, stop=[stop])[0]
    assert cut == full[: full.index(stop)]
    steps = list(stream_ids(m, list(b"x" * 60), 100, temperature=0))
    assert len(steps) == 4  # block_size 64 leaves room for 4 new tokens


def test_decoding_builds_no_autograd_graph():
    m = model()
    seen = []
    m.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.requires_grad))
    list(stream_ids(m, list(b"ab"), max_tokens=3))
    assert seen and not any(seen)

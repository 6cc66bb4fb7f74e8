"""The generation engine on a tiny random GPT with a real (tiny) trained lathe tokenizer."""

import threading

import pytest
import torch

from lathe.chat import render_chat
from lathe.config import ModelConfig, TokenizerConfig
from lathe.errors import LatheError
from lathe.model import GPT
from lathe.serve.constrained import Constraint
from lathe.serve.engine import Engine, EngineBusy, Request
from lathe.tokenizer import Tokenizer, train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A tiny model writes text, one token at a time.",
    'def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # {"name": "lathe", "ok": true}',
    "Numbers like 12, 345 and 6789 are split one digit per token. Caf\u00e9 cr\u00e8me, na\u00efve.",
] * 3


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, TokenizerConfig(vocab_size=320, min_frequency=1))


def tiny_model(tok, block_size=96, seed=0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=block_size)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def engine(tok) -> Engine:
    return Engine(tiny_model(tok), tok)


def greedy_reference(model, ids: list[int], steps: int, penalty: float = 1.0) -> list[int]:
    """Greedy decoding the slow way: the full sequence through the model at every step, no cache
    (compare with ignore_eos=True, where special tokens are ordinary tokens)."""
    ids = list(ids)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0][0, -1].float()
        if penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[torch.tensor(ids)] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        nxt = int(logits.argmax())
        ids.append(nxt)
        out.append(nxt)
    return out


def text_only(engine: Engine, request: Request) -> Request:
    """Keep a random model off the special tokens (which end a sample) with a regex over plain text."""
    return request.model_copy(update={"constraint": Constraint.regex(r"[a-z .,]{0,200}")})


def test_batched_left_padded_requests_match_each_alone_and_the_uncached_model(engine, tok):
    prompts = ["The quick", "def add(a, b):\n    return", "A"]
    requests = [text_only(engine, Request(prompt=p, max_tokens=12, temperature=0)) for p in prompts]
    batched = engine.generate(requests)
    for request, result in zip(requests, batched):
        [alone] = engine.generate([request])
        assert alone.choices[0].token_ids == result.choices[0].token_ids
        assert result.usage.prompt_tokens == len(result.prompt_ids)
    # without the constraint the random model may hit a special token: compare the cache with no cache
    ids = [tok.bos_id] + tok.encode("The quick")
    [plain] = engine.generate([Request(prompt=ids, max_tokens=10, temperature=0, ignore_eos=True)])
    reference = greedy_reference(engine.model, ids, 10)
    assert plain.choices[0].token_ids == reference


def test_samples_share_one_prefill_and_a_seed_makes_them_repeatable(engine):
    request = Request(prompt="The", max_tokens=16, temperature=1.0, n=4, seed=11, ignore_eos=True)
    [a] = engine.generate([request])
    [b] = engine.generate([request])
    texts = [c.token_ids for c in a.choices]
    assert texts == [c.token_ids for c in b.choices]
    assert len({tuple(t) for t in texts}) > 1  # the samples differ from each other
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert a.usage.completion_tokens == 4 * 16 and a.usage.prompt_tokens == len(a.prompt_ids)
    # a seeded request draws from its own generator: other requests in the batch do not change it
    other = Request(prompt="def add(a, b): return a + b", max_tokens=5, temperature=0.7, n=2, ignore_eos=True)
    _, c = engine.generate([other, request])
    assert [ch.token_ids for ch in c.choices] == texts
    [d] = engine.generate([request.model_copy(update={"seed": 12})])
    assert [ch.token_ids for ch in d.choices] != texts


def test_one_prefill_serves_every_sample(engine):
    shapes = []
    hook = engine.model.embed.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    try:
        engine.generate([Request(prompt="The quick brown", n=5, max_tokens=6, temperature=1.0, seed=0, ignore_eos=True),
                         Request(prompt="A", n=2, max_tokens=6, temperature=1.0, seed=1, ignore_eos=True)])
    finally:
        hook.remove()
    prefill, *steps = shapes
    assert prefill[0] == 2 and prefill[1] > 1  # both prompts in one left-padded prefill
    assert all(shape == (7, 1) for shape in steps) and len(steps) == 5  # then 7 rows, one token each


def test_top_k_1_and_a_tiny_top_p_are_greedy(engine):
    greedy = Request(prompt="The quick", max_tokens=10, temperature=0, ignore_eos=True)
    [g] = engine.generate([greedy])
    for update in ({"temperature": 1.5, "top_k": 1, "seed": 4}, {"temperature": 1.5, "top_p": 1e-6, "seed": 5}):
        [r] = engine.generate([greedy.model_copy(update=update)])
        assert r.choices[0].token_ids == g.choices[0].token_ids
    [hot] = engine.generate([greedy.model_copy(update={"temperature": 1.5, "seed": 4})])
    assert hot.choices[0].token_ids != g.choices[0].token_ids


def test_repetition_penalty_matches_the_reference_rule(engine, tok):
    ids = [tok.bos_id] + tok.encode("the the the quick")
    plain_ref = greedy_reference(engine.model, ids, 8)
    penalized_ref = greedy_reference(engine.model, ids, 8, penalty=1.8)
    assert plain_ref != penalized_ref
    [r] = engine.generate([Request(prompt=ids, max_tokens=8, temperature=0, repetition_penalty=1.8, ignore_eos=True)])
    assert r.choices[0].token_ids == penalized_ref


def test_stop_strings_cut_the_text_and_never_reach_the_stream(engine):
    base = text_only(engine, Request(prompt="The quick", max_tokens=30, temperature=0))
    full = engine.generate([base])[0].choices[0].text
    assert len(full) > 8
    stop = full[4:7]
    request = base.model_copy(update={"stop": [stop, "never-appears"]})
    deltas = list(engine.stream(request))
    streamed = "".join(d.text for d in deltas)
    result = deltas[-1].result
    assert result.choices[0].text == streamed == full[: full.index(stop)]
    assert result.choices[0].finish_reason == "stop"
    assert [d.finish_reason for d in deltas].count("stop") == 1 and deltas[-1].finish_reason == "stop"


def test_stream_never_splits_a_character(tok):
    # the tokenizer never saw the euro sign: each character is three single-byte tokens
    assert len(tok.encode("\u20ac")) == 3
    engine = Engine(tiny_model(tok), tok)
    request = Request(prompt="Price:", max_tokens=40, temperature=1.0, seed=3,
                      constraint=Constraint.regex("\u20ac\u20ac[a-z]{2}"))
    deltas = list(engine.stream(request))
    text = deltas[-1].result.choices[0].text
    assert text.startswith("\u20ac\u20ac") and len(text) == 4 and "".join(d.text for d in deltas) == text
    assert all("\ufffd" not in d.text for d in deltas)
    assert len(deltas[-1].result.choices[0].token_ids) >= 8  # six byte tokens for the two euro signs


def test_chat_messages_use_the_chat_template_with_the_assistant_start(engine, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    ids, hits = engine.prompt_ids(Request(messages=messages))
    assert ids == render_chat(tok, messages, add_generation_prompt=True)[0] and hits == []
    assert ids[-1] == tok.special_id("assistant_start")


def test_limits_and_bad_requests(tok):
    engine = Engine(tiny_model(tok, block_size=24), tok)
    [r] = engine.generate([Request(prompt="The quick brown fox", max_tokens=100, temperature=0, ignore_eos=True)])
    assert r.choices[0].finish_reason == "length"
    assert len(r.prompt_ids) + len(r.choices[0].token_ids) <= 24 + 1  # the context bounds the output
    with pytest.raises(LatheError, match="context is 24"):
        engine.generate([Request(prompt="The quick brown fox jumps over the lazy dog " * 3)])
    with pytest.raises(LatheError, match="temperature"):
        engine.generate([{"prompt": "x", "temperature": -1}])
    with pytest.raises(LatheError, match="exactly one of prompt or messages"):
        engine.generate([{"max_tokens": 3}])
    with pytest.raises(LatheError, match="messages"):
        engine.generate([{"messages": [{"role": "robot", "content": "hi"}]}])
    with pytest.raises(LatheError, match="token ids"):
        engine.generate([{"prompt": [tok.vocab_size + 5]}])


def test_one_batch_at_a_time(engine):
    stream = engine.stream(Request(prompt="The", max_tokens=20, temperature=0, ignore_eos=True))
    next(stream)
    with pytest.raises(EngineBusy):
        engine.generate([Request(prompt="A", max_tokens=2)])
    errors = []
    worker = threading.Thread(target=lambda: errors.append(_busy(engine)))
    worker.start()
    worker.join()
    assert errors == [True]
    stream.close()  # an abandoned stream releases the engine when closed
    assert engine.generate([Request(prompt="A", max_tokens=2, ignore_eos=True)])[0].usage.completion_tokens == 2


def _busy(engine) -> bool:
    try:
        engine.generate([Request(prompt="A", max_tokens=2)])
    except EngineBusy:
        return True
    return False


def test_engine_loads_a_run_directory(tmp_path, tok, engine):
    from lathe.train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "checkpoints", 1, engine.model, None, {})
    tok.save(tmp_path / "tokenizer.json")
    loaded = Engine.load(tmp_path)
    request = Request(prompt="The quick", max_tokens=6, temperature=0, ignore_eos=True)
    assert loaded.generate([request])[0].choices[0].token_ids == engine.generate([request])[0].choices[0].token_ids
    with pytest.raises(LatheError, match="tokenizer.json"):
        (tmp_path / "tokenizer.json").unlink()
        Engine.load(tmp_path)

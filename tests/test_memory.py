"""Task memory: SQLite + FTS5 + sqlite-vec with real MiniLM embeddings, and retrieval into prompts."""

import argparse

import pytest
import torch

from lathe.config import ModelConfig, TokenizerConfig
from lathe.errors import LatheError
from lathe.model import GPT
from lathe.serve.engine import Engine, Request
from lathe.serve.memory import MemoryStore, augment_messages
from lathe.serve.memory_cli import register
from lathe.tokenizer import train_tokenizer

FACT = "The vault access code for the Zorbania branch is 7319."
DISTRACTORS = [("knowledge", "Bananas ripen faster next to apples."),
               ("style", "Answer in one short sentence."),
               ("experience", "Customers asking about refunds were happier when told the exact deadline.")]
REFUND = "Purchases may be returned for a full refund within thirty days."


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> MemoryStore:
    store = MemoryStore(tmp_path_factory.mktemp("memory") / "memory.sqlite")
    store.add("bank", "knowledge", FACT)
    for kind, text in DISTRACTORS:
        store.add("bank", kind, text)
    store.add("shop", "knowledge", REFUND)
    yield store
    store.close()


def test_add_search_list_remove_round_trip(store):
    entry = store.add("bank", "experience", "The night shift forgets to lock the side door.")
    assert store.get(entry.id) == entry
    assert entry in store.list("bank", "experience") and entry not in store.list("shop")
    [hit] = store.search("bank", "side door lock", k=1)
    assert hit.entry == entry and hit.text_rank == 1 and hit.similarity > 0.3
    assert store.tasks() == {"bank": 5, "shop": 1}
    assert store.remove(entry.id) == entry
    assert entry.id not in [h.entry.id for h in store.search("bank", "side door lock", k=10)]
    assert store.db.execute("SELECT count(*) FROM entries_vec").fetchone()[0] == 5  # both indexes cleaned
    with pytest.raises(LatheError, match="no memory entry"):
        store.remove(entry.id)
    with pytest.raises(LatheError, match="kind 'rumour'"):
        store.add("bank", "rumour", "text")
    with pytest.raises(LatheError, match="task"):
        store.add(" ", "style", "text")


def test_a_paraphrase_is_found_by_meaning_and_tasks_stay_apart(store):
    # no word in common with the entry: only the vector search can find it
    [hit] = store.search("shop", "How long do I have to bring an item back for my money?", k=1)
    assert hit.entry.text == REFUND and hit.text_rank is None and hit.similarity > 0.3
    hits = store.search("bank", "What is the secret number to open the safe?", k=2)
    assert hits[0].entry.text == FACT
    assert REFUND not in [h.entry.text for h in store.search("bank", "refund within thirty days", k=10)]
    assert [h.entry.kind for h in store.search("bank", "refund deadline", k=3, kind="style")] == ["style"]


def test_augment_messages_puts_the_entries_in_the_system_message(store):
    messages = [{"role": "system", "content": "You are a bank assistant."},
                {"role": "user", "content": "What is the code of the Zorbania vault?"}]
    augmented = augment_messages(messages, store, "bank", k=2)
    assert augmented[0]["content"].startswith("You are a bank assistant.") and FACT in augmented[0]["content"]
    assert augmented[1:] == messages[1:] and messages[0]["content"] == "You are a bank assistant."
    [first, user] = augment_messages(messages[1:], store, "bank", k=1)
    assert first["role"] == "system" and FACT in first["content"] and user == messages[1]


def test_retrieval_changes_the_answer(store):
    tok = train_tokenizer([FACT, *[t for _, t in DISTRACTORS], REFUND, "What is the code?"] * 3,
                          TokenizerConfig(vocab_size=300, min_frequency=1))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=256)).eval()
    with torch.no_grad():  # large random weights: an untrained model whose output depends on its prompt
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    engine = Engine(model, tok, memory=store)
    question = [{"role": "user", "content": "What is the access code of the Zorbania vault?"}]
    common = dict(messages=question, max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    with_memory, without = engine.generate([Request(**common, memory_task="bank", memory_k=2), Request(**common)])
    assert "7319" in tok.decode(with_memory.prompt_ids)  # the fact reached the model's prompt ...
    assert "7319" not in tok.decode(without.prompt_ids)  # ... and only through memory
    assert with_memory.memory[0].entry.text == FACT and without.memory == []
    assert with_memory.choices[0].token_ids != without.choices[0].token_ids  # so the answer changes
    with pytest.raises(LatheError, match="no memory store"):
        Engine(model, tok).generate([Request(**common, memory_task="bank")])


def test_cli_add_search_list_remove(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="lathe")
    register(parser.add_subparsers(dest="command", required=True))
    db = str(tmp_path / "m.sqlite")

    def lathe(*argv) -> str:
        args = parser.parse_args([*argv, "--db", db])
        assert args.handler(args) == 0
        return capsys.readouterr().out

    assert lathe("memory", "add", "--task", "shop", "--kind", "knowledge", REFUND) == "added #1 to shop (knowledge)\n"
    lathe("memory", "add", "--task", "shop", "--kind", "style", "Be", "polite.")
    assert "#1" in lathe("memory", "search", "--task", "shop", "-k", "1", "can I return it for my money back?")
    listed = lathe("memory", "list", "--task", "shop")
    assert REFUND in listed and "(style) Be polite." in listed
    assert "removed #2" in lathe("memory", "remove", "2")
    assert "Be polite" not in lathe("memory", "list")
    with pytest.raises(SystemExit):
        parser.parse_args(["memory", "add", "--task", "t", "--kind", "gossip", "x"])

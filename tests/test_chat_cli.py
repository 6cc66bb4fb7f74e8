"""`lathe chat` driven through a pipe (no terminal), and its context trimming in process."""

import json
import os
import subprocess
import sys

from lathe.cli import main as lathe_main
from lathe.serve.chat_cli import ChatSession, run_chat
from lathe.serve.server import load_models
from test_server import FOX, ROOT, expected, reference, run_dir  # noqa: F401  (fixtures)


def test_chat_over_a_pipe_with_history_and_slash_commands(run_dir, reference, tmp_path):
    saved = tmp_path / "chat.json"
    script = ["/temp 0", "Tell me about the fox.", f"/save {saved}", "/reset", "/system Be brief.",
              "Tell me about the fox.", "/adapter math", "And the dog?", "/adapter nope", "/temp hot", "/bogus",
              "/help", "/quit", "never read"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lathe", "chat", "--run", str(run_dir), "--max-tokens", "10",
                           "--adapter", f"math={run_dir / 'adapters' / 'math'}"],
                          input="\n".join(script) + "\n", capture_output=True, text=True, timeout=180,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    tiny, math = reference["tiny"], reference["math"]
    [first] = expected(tiny, messages=[FOX[1]], max_tokens=10)
    [second] = expected(tiny, messages=FOX, max_tokens=10)  # after /reset and /system: a fresh conversation
    history = FOX + [{"role": "assistant", "content": second}, {"role": "user", "content": "And the dog?"}]
    [third] = expected(math, messages=history, max_tokens=10)  # the adapter answers the whole history
    assert proc.stdout == f"{first}\n{second}\n{third}\n"  # replies only: notes go to stderr
    assert json.loads(saved.read_text()) == {"model": run_dir.name, "temperature": 0.0, "max_tokens": 10,
                                             "messages": [FOX[1], {"role": "assistant", "content": first}]}
    for note in ["no adapter named 'nope'", "/temp needs a number", "unknown command /bogus", "/system TEXT"]:
        assert note in proc.stderr
    assert "never read" not in proc.stdout + proc.stderr


def test_the_oldest_turns_make_room_when_the_context_fills(run_dir, reference, capsys):
    models = load_models(run_dir, name="tiny")
    session = ChatSession(models, "tiny", system="Be brief.", temperature=0, max_tokens=8)
    engine = models["tiny"].engine
    written = []
    lines = [f"Turn {i}: tell me about the quick brown fox and the lazy dog." for i in range(8)]
    run_chat(session, lines, written.append)
    assert "dropped the" in capsys.readouterr().err
    assert session.messages[0]["role"] == "user" and session.messages[-1]["role"] == "assistant"
    assert session.messages[-2]["content"] == lines[-1] and len(session.messages) < 2 * len(lines)
    kept = session.conversation()[:-1]  # what the last reply was written for
    assert session.messages[-1]["content"] == expected(reference["tiny"], messages=kept, max_tokens=8)[0]
    assert len(engine.prompt_ids(engine_request(kept))[0]) + 8 <= engine.context
    # a single message longer than the context is refused, and the history stays as it was
    before = list(session.messages)
    run_chat(session, ["fox " * 200], written.append)
    assert "context is 128" in capsys.readouterr().err and session.messages == before


def engine_request(messages):
    from lathe.serve.engine import Request

    return Request(messages=messages)


def test_chat_bad_run_is_one_line_exit_2(tmp_path, capsys):
    assert lathe_main(["chat", "--run", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1

"""`lathe chat`: talk with a trained run in the terminal; replies stream as the model writes them.

    lathe chat --run runs/my-run --adapter math=adapters/math --system "Be brief."
    you> What is 2+2?
    my-run> ...
    you> /adapter math

The conversation so far is the prompt of every turn (the oldest turns are dropped when it outgrows
the model's context). Slash commands change the settings between turns; see HELP.

Without a terminal (stdin from a pipe or a file) there are no prompts: each input line is a turn or
a command, each reply goes to stdout followed by a newline, and notes go to stderr, so
`printf 'hello\\n/quit\\n' | lathe chat --run R` prints just the reply.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable

from lathe.errors import LatheError
from lathe.io import write_json

HELP = """commands:
  /help            this list
  /reset           forget the conversation (the system prompt stays)
  /system TEXT     set the system prompt (/system alone removes it)
  /temp X          sampling temperature, 0 = greedy
  /adapter NAME    answer with adapter NAME; /adapter base for none, /adapter alone lists them
  /save FILE       write the conversation and settings to FILE (JSON)
  /quit            leave (so does end of input)"""


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class ChatSession:
    """The conversation and settings; `models` comes from `lathe.serve.server.load_models`."""

    models: dict  # name -> Served (the base first, then its adapters)
    model: str
    system: str | None = None
    temperature: float = 0.7
    max_tokens: int = 256
    top_p: float | None = None
    seed: int | None = None
    messages: list[dict] = field(default_factory=list)  # user and assistant turns, oldest first

    @property
    def base(self) -> str:
        return next(iter(self.models))

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    # --- one turn ---------------------------------------------------------------------------------
    def turn(self, text: str, write: Callable[[str], None]) -> str:
        """Add the user's message, stream the reply through `write`, and keep both in the history.
        A message that cannot fit the context raises LatheError and leaves the history as it was."""
        served = self.models[self.model]
        self.messages, request = self._fit(served.engine, self.messages + [{"role": "user", "content": text}])
        served.activate()
        reply, calls = self._stream(served.engine, request, write)
        message = {"role": "assistant", "content": reply}
        if calls:
            message["tool_calls"] = calls
        self.messages.append(message)
        return reply

    def _request(self, messages: list[dict]):
        from lathe.serve.engine import Request

        system = [{"role": "system", "content": self.system}] if self.system else []
        return Request(messages=system + messages, max_tokens=self.max_tokens, temperature=self.temperature,
                       top_p=self.top_p, seed=self.seed)

    def _fit(self, engine, messages: list[dict]):
        """The messages to keep and their request: the oldest turns go until the prompt leaves room
        for a reply (a quarter of the context, or max_tokens if smaller)."""
        room = min(self.max_tokens, engine.context // 4)
        dropped = 0
        while True:
            request = self._request(messages)
            try:
                fits = len(engine.prompt_ids(request)[0]) + room <= engine.context
            except LatheError:  # longer than the context
                if len(messages) == 1:
                    raise
                fits = False
            if fits or len(messages) == 1:
                if dropped:
                    note(f"(dropped the {dropped} oldest messages to fit the model's context)")
                return messages, request
            messages = messages[1:]
            dropped += 1
            while messages[0]["role"] != "user":  # a turn starts with the user
                messages = messages[1:]
                dropped += 1

    @staticmethod
    def _stream(engine, request, write) -> tuple[str, list[dict]]:
        stream = engine.stream(request)
        pieces, calls = [], []
        try:
            for delta in stream:
                if delta.text:
                    pieces.append(delta.text)
                    write(delta.text)
                if delta.result is not None:
                    calls = [c.as_message_call() for c in delta.result.choices[0].tool_calls]
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat; what arrived is kept
            stream.close()
            note("\n(stopped)")
        return "".join(pieces), calls

    # --- slash commands ---------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a slash command; False means quit."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            note(HELP)
        elif name == "/reset":
            self.messages.clear()
            note("(conversation cleared)")
        elif name == "/system":
            self.system = arg or None
            note(f"(system prompt: {arg})" if arg else "(system prompt removed)")
        elif name == "/temp":
            self._set_temperature(arg)
        elif name == "/adapter":
            self._set_adapter(arg)
        elif name == "/save":
            self._save(arg)
        else:
            note(f"unknown command {name}; /help lists them")
        return True

    def _set_temperature(self, arg: str) -> None:
        try:
            value = float(arg)
        except ValueError:
            value = -1.0
        if not 0 <= value <= 2:
            note(f"/temp needs a number from 0 to 2, got '{arg}'")
            return
        self.temperature = value
        note(f"(temperature {value:g})")

    def _set_adapter(self, arg: str) -> None:
        names = list(self.models)[1:]
        if not arg:
            note(f"(answering with {self.model}; adapters: {', '.join(names) or 'none loaded (see --adapter)'})")
            return
        name = self.base if arg == "base" else arg
        if name not in self.models:
            note(f"no adapter named '{arg}' (adapters: {', '.join(names) or 'none loaded (see --adapter)'})")
            return
        self.model = name
        note(f"(answering with {name})")

    def _save(self, path: str) -> None:
        if not path:
            note("/save needs a file name")
            return
        write_json(path, {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                          "messages": self.conversation()})
        note(f"(saved {len(self.messages)} messages to {path})")


def run_chat(session: ChatSession, lines: Iterable[str], write: Callable[[str], None]) -> None:
    """Each line is a turn or a slash command; errors in a turn are reported and the chat goes on."""
    for line in lines:
        line = line.rstrip("\r\n")
        if line.startswith("/"):
            if not session.command(line):
                return
            continue
        if not line.strip():
            continue
        try:
            session.turn(line, write)
        except LatheError as e:
            note(f"error: {e}")
            continue
        write("\n")


def terminal_lines(session: ChatSession) -> Iterable[str]:
    """Lines typed at a prompt (with readline editing and history), until Ctrl-D."""
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    except ImportError:
        pass
    note(f"chatting with {session.model}; /help for commands, /quit or Ctrl-D to leave")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if line.strip() and not line.startswith("/"):
            print(f"{session.model}> ", end="", flush=True)
        yield line


def chat_main(args) -> int:
    from lathe.rundir import RunDir
    from lathe.serve.server import load_models

    run = RunDir.resolve(args.run)
    models = load_models(run.path, dict(args.adapter), args.device)
    session = ChatSession(models, model=next(iter(models)), system=args.system, temperature=args.temperature,
                          max_tokens=args.max_tokens, top_p=args.top_p, seed=args.seed)
    if args.use:
        session.command(f"/adapter {args.use}")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    lines = terminal_lines(session) if sys.stdin.isatty() else sys.stdin
    run_chat(session, lines, write)
    return 0

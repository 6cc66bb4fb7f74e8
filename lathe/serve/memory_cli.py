"""`lathe memory add|search|list|remove`: manage the task memory the engine retrieves into prompts.

    lathe memory add --task support --kind knowledge "The refund window is 30 days."
    lathe memory search --task support "how long can I return an item?"
    lathe memory list --task support
    lathe memory remove 3
"""

from __future__ import annotations

import time

from lathe.serve.memory import DEFAULT_DB, KINDS  # a light import: numpy, apsw and the model load on use


def register(sub) -> None:
    p = sub.add_parser("memory", help="task memory: knowledge, experiences and style notes retrieved into prompts")
    verbs = p.add_subparsers(dest="memory_command", required=True)

    add = verbs.add_parser("add", help="add an entry")
    add.add_argument("--task", required=True)
    add.add_argument("--kind", required=True, choices=KINDS)
    add.add_argument("text", nargs="+", help="the entry (several words are joined with spaces)")
    add.set_defaults(handler=_add)

    search = verbs.add_parser("search", help="the entries most relevant to a query (words + meaning)")
    search.add_argument("--task", required=True)
    search.add_argument("--kind", choices=KINDS)
    search.add_argument("-k", type=int, default=5, help="how many entries (default 5)")
    search.add_argument("query", nargs="+")
    search.set_defaults(handler=_search)

    show = verbs.add_parser("list", help="list entries")
    show.add_argument("--task")
    show.add_argument("--kind", choices=KINDS)
    show.set_defaults(handler=_list)

    remove = verbs.add_parser("remove", help="remove an entry by id")
    remove.add_argument("id", type=int)
    remove.set_defaults(handler=_remove)

    for parser in (add, search, show, remove):
        parser.add_argument("--db", default=str(DEFAULT_DB), help=f"memory database (default {DEFAULT_DB})")


def _store(args):
    from lathe.serve.memory import MemoryStore

    return MemoryStore(args.db)


def _add(args) -> int:
    with _store(args) as store:
        entry = store.add(args.task, args.kind, " ".join(args.text))
    print(f"added #{entry.id} to {entry.task} ({entry.kind})")
    return 0


def _search(args) -> int:
    with _store(args) as store:
        hits = store.search(args.task, " ".join(args.query), args.k, args.kind)
    if not hits:
        print(f"no entries for task {args.task}")
    for hit in hits:
        similarity = f"{hit.similarity:.2f}" if hit.similarity is not None else "  - "
        print(f"#{hit.entry.id:<5} score {hit.score:.4f}  similarity {similarity}  ({hit.entry.kind}) {hit.entry.text}")
    return 0


def _list(args) -> int:
    with _store(args) as store:
        entries = store.list(args.task, args.kind)
    for e in entries:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created))
        print(f"#{e.id:<5} {created}  {e.task}  ({e.kind}) {e.text}")
    if not entries:
        print("no entries")
    return 0


def _remove(args) -> int:
    with _store(args) as store:
        entry = store.remove(args.id)
    print(f"removed #{entry.id} from {entry.task} ({entry.kind}): {entry.text}")
    return 0

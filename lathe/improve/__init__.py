"""The improve loop: a trainer that improves its own model with no human in the loop.

    lathe improve --name add                 # 3-digit addition: base model, 5 rounds, two control arms
    lathe improve --name add --resume        # after a kill: continue from the last finished step
    lathe improve --name add --forever       # keep going; inbox/*.jsonl joins the originals
    lathe improve --name add --tune          # tune the training recipe under a fixed budget

See loop.py for the phases of a round, data.py for the run directory, gate.py for promotion.
"""

from lathe.improve.config import ImproveConfig, load_improve_config

__all__ = ["ImproveConfig", "load_improve_config"]

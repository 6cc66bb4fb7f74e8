"""Alignment: reward models, DPO and RL with verifiable rewards (GRPO family).

    pairs.py   preference pairs (jsonl, or ranked samples of the model), shared tokenization/batches
    reward.py  RewardModel + Bradley-Terry training, pairwise accuracy
    dpo.py     DPO against a frozen reference, preference accuracy, margins, KL
    grpo.py    group-relative policy optimization with verifiable rewards
    cli.py     `lathe align reward | dpo | rl | pairs`

Import the submodules directly (this package stays light: the CLI imports it at start-up).
"""

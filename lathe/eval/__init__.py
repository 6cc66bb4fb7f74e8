"""Evaluation: `lathe eval`, `lathe arena` and the numbers in the report card.

    metrics.py     pure metric functions (perplexity, F1, BLEU/chrF, exact match, win rates, ...)
    perplexity.py  loss / perplexity / bits-per-byte of a model on a token array
    loglik.py      model-side primitives: continuation log-likelihoods, greedy completion
    tasks.py       the eval tasks (text, gsm8k, mc, classify, translate) and their result files
    bias.py        the bias probe (templated sentences that swap demographic terms)
    arena.py       A-versus-B: same prompts, a verifier or judge model decides, Wilson interval
    harness.py     lm-evaluation-harness adapter (needs `pip install lm-eval`)
    cli.py         the `eval` and `arena` verbs
"""

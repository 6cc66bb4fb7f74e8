"""lathe: a workshop for training language models end to end, and for letting a model improve itself."""

__version__ = "0.1.0"

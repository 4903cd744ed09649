"""Miniatures for tests: released models' config keys, weight names and tokenizer kinds, with
tiny random weights, built on the fly (nothing is downloaded).

Import the submodules: `tinyllava_edge.testing.tokenizers` (tokenizers of each released kind)
and `tinyllava_edge.testing.checkpoints` (checkpoints in each layout).
"""

"""Training small models with and without mitigations: the text and tokenizer (text.py), the architectures
(architectures.py), the loop with checkpoints (loop.py) and the named zoo trained on first use (zoo.py)."""

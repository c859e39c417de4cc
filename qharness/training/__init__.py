"""Training small models with and without mitigations: the text and tokenizer (text.py), the architectures
(architectures.py), the loop with checkpoints (loop.py), one run end to end (run.py), the zoo's models trained on
first use (zoo.py) and `ensure(name)`, which the commands call before they load a model (ensure.py)."""

"""The massive-activation profile: statistics of every decoder layer's output (stats.py), gathered with hooks in
one forward pass per sequence (scan.py), the paper's intervention (intervene.py) and its plots (plots.py)."""

"""What a run reads and writes besides weights: the leaderboard (results.py), the per-unit results kept beside it
(units.py) and the training recipes whose digests name trained models (recipe.py)."""

"""From leaderboard rows to a report: each row's degradation against its baseline, the within-noise comparisons, the
tables of mitigations, fixes, predictors, seeds, curves and costs, and `compare`, which writes them all."""

"""Pure statistics with no notion of models or leaderboards: the block bootstrap behind every interval and the rank
statistics behind the predictors."""

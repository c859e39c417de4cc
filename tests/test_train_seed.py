"""Trained models carry their training seed into every row (train_seed), and the seeds of one recipe share a
digest (train_recipe) so that they can be grouped."""

from dataclasses import replace

import pytest

from qharness.data.recipe import ArchConfig, Recipe, TrainConfig
from qharness.data.results import read_rows
from qharness.experiment.runner import run
from qharness.experiment.settings import RunSettings
from qharness.models.sources import training_seed


@pytest.fixture()
def train_tiny(monkeypatch, tmp_path, tiny_tokenizer, training_tokens):
    from qharness.training import run as training

    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(training, "training_corpus",
                        lambda progress=True: (tiny_tokenizer, training_tokens, {"test": True}))
    recipe = Recipe(arch=ArchConfig(d_model=32, layers=2, heads=2, context=32, vocab_size=len(tiny_tokenizer)),
                    train=TrainConfig(steps=2, batch_size=2, context=32, warmup=1, log_every=1, checkpoint_every=2))

    def train(name: str, **changes) -> str:
        out = tmp_path / name
        training.train_model(replace(recipe, train=replace(recipe.train, **changes)), out, progress=False)
        return str(out / "model")

    return train


def test_seeds_of_one_recipe_share_a_digest_and_reach_the_rows(train_tiny, tiny_task_dir, tmp_path):
    seed3, seed4, other = train_tiny("s3", seed=3), train_tiny("s4", seed=4), train_tiny("lr", seed=3, lr=1e-4)
    (s3, recipe3), (s4, recipe4), (_, recipe_other) = map(training_seed, (seed3, seed4, other))
    assert (s3, s4) == (3, 4) and recipe3 == recipe4 and recipe3 != recipe_other and len(recipe3) == 12
    results = tmp_path / "lb.csv"
    run(RunSettings(model=seed4, device="cpu", tasks=(str(tiny_task_dir / "short.yaml"),), results=results),
        say=lambda m: None, progress=False)
    assert {(r["train_seed"], r["train_recipe"]) for r in read_rows(results)} == {("4", recipe4)}


def test_models_not_trained_here_have_no_training_seed(tiny_model_dir):
    assert training_seed(str(tiny_model_dir)) == (None, "")
    assert training_seed("no/such/model") == (None, "")

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


def test_a_record_written_before_a_setting_existed_shares_its_recipes_digest():
    """The 400-step control of seed 0 was recorded before TuneRecipe had `retrofit` and its seeds 1-2 after; zoo
    records before `precision` and `grad_accum`. A setting a record lacks counts at the value it had before it
    existed, so every seed of a recipe shares the digest; a setting at another value still tells recipes apart."""
    from qharness.data.recipe import unseeded_digest

    train = {"steps": 400, "lr": 2e-4, "seed": 0, "budget_minutes": None}
    old = {"base": "smollm2-135m", "mitigation": "none", "train": train, "digest": "915429699a"}
    new = {**old, "retrofit": "", "train": {**train, "seed": 1, "precision": "fp32", "grad_accum": 1},
           "digest": "020f31cfca"}
    assert unseeded_digest(old) == unseeded_digest(new)
    assert unseeded_digest({**new, "retrofit": "dyt-sequential"}) != unseeded_digest(old)
    assert unseeded_digest({**new, "train": {**new["train"], "precision": "bf16"}}) != unseeded_digest(old)
    budgeted = {**new, "train": {**new["train"], "budget_minutes": 30.0}}
    assert unseeded_digest(budgeted) == unseeded_digest(old), "a call's time budget is not a setting"
    zoo_old = {"arch": {"arch": "llama", "d_model": 128}, "train": train, "mitigation": "none"}
    zoo_new = {**zoo_old, "arch": {"arch": "llama", "d_model": 128, "mlp_hidden": None}}
    assert unseeded_digest(zoo_old) == unseeded_digest(zoo_new) != unseeded_digest(old)


def test_refresh_rederives_the_training_columns_and_touches_nothing_else(train_tiny, tmp_path, tiny_model_dir):
    from qharness.data.results import append_rows, make_row
    from qharness.experiment.refresh_training import main

    trained = train_tiny("s5", seed=5)
    seed, recipe = training_seed(trained)
    results = tmp_path / "old.csv"
    stale = make_row(20.0, 20.0, model=trained, quant="none", task="t", metric="ppl", train_seed="5",
                     train_recipe="416e4e9383bf")  # as an older derivation wrote it
    foreign = make_row(30.0, 30.0, model=str(tiny_model_dir), quant="none", task="t", metric="ppl",
                       train_seed="", train_recipe="")
    append_rows(results, [stale, foreign])
    assert main([str(results)]) == 0
    rows = {r["model"]: r for r in read_rows(results)}
    assert (rows[trained]["train_seed"], rows[trained]["train_recipe"]) == (str(seed), recipe) != ("5", "416e4e9383bf")
    assert {k: v for k, v in rows[trained].items() if k != "train_recipe"} == \
        {k: str(v) if v is not None else "" for k, v in stale.items() if k != "train_recipe"}
    assert rows[str(tiny_model_dir)]["train_recipe"] == ""
    assert main([str(tmp_path / "missing.csv")]) == 2

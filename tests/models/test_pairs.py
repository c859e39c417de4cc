"""Published pairs (`pair:` names): resolution only. Nothing here downloads: the hub is switched off and the loader
that would fetch weights is replaced, so a test that reached the network would fail instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from qharness.cli import main
from qharness.core.errors import ModelLoadError, UnknownName
from qharness.experiment.sweep import SweepConfig
from qharness.models import loading
from qharness.models.sources import ModelSpec, classify, load_model, name_columns, source_for
from qharness.models.sources import pairs as pair_names

SWEEP = Path(__file__).resolve().parents[2] / "sweeps" / "pairs.yaml"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_download(name, dtype):
        raise AssertionError(f"tried to load {name}")

    monkeypatch.setattr(loading, "load_pretrained", no_download)


@pytest.mark.parametrize(("name", "hub_id", "family", "mitigation"), [
    ("pair:osp-1.4b-adam", "dmis-lab/OSP-1.4B-1T-Adam", "pair:osp-1.4b", "none"),
    ("pair:osp-1.4b-muon", "dmis-lab/OSP-1.4B-1T-Muon-SSNorm-EmbProj", "pair:osp-1.4b", "muon+ssnorm+embproj"),
    ("pair:osp-1.4b-100b-adam", "dmis-lab/OSP-1.4B-100B-Adam", "pair:osp-1.4b-100b", "none"),
    ("pair:osp-1.4b-100b-muon-ssnorm", "dmis-lab/OSP-1.4B-100B-Muon-SSNorm", "pair:osp-1.4b-100b", "muon+ssnorm"),
])
def test_aliases_resolve_to_their_hub_ids_and_families(name, hub_id, family, mitigation):
    assert classify(name) == "pairs"
    entry = pair_names.published(name)
    assert entry.hub_id == hub_id and entry.source.startswith("https://")
    assert source_for(name).family(name) == family
    assert name_columns(name) == {"mitigation": mitigation, "family": family}


def test_every_family_has_one_baseline_and_every_entry_a_source():
    families: dict[str, list[str]] = {}
    for entry in pair_names.PAIRS:
        families.setdefault(entry.family, []).append(entry.mitigation)
        assert entry.source.startswith("https://") and "/" in entry.hub_id
    assert all(mitigations.count("none") == 1 and len(mitigations) > 1 for mitigations in families.values())


def test_a_pair_loads_its_hub_id_and_records_its_mitigation(monkeypatch, tiny_model_dir):
    """The weights are the tiny model's (nothing downloads); what the row records comes from the alias."""
    asked = []

    def fake(name, dtype):
        asked.append(name)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)

    monkeypatch.setattr(loading, "load_pretrained", fake)
    loaded = load_model(ModelSpec("pair:osp-1.4b-muon", device="cpu"), progress=False)
    assert asked == ["dmis-lab/OSP-1.4B-1T-Muon-SSNorm-EmbProj"]
    assert (loaded.mitigation, loaded.family) == ("muon+ssnorm+embproj", "pair:osp-1.4b")
    assert loaded.source == "hub:dmis-lab/OSP-1.4B-1T-Muon-SSNorm-EmbProj (pair:osp-1.4b-muon)"


def test_a_pair_that_needs_remote_code_is_refused_in_one_line():
    with pytest.raises(ModelLoadError, match=r"pair:gated-1b-headwise \(QwQZh/gated_attention\) needs the authors' "
                                             r"model code: .*no trust_remote_code\)$"):
        classify("pair:gated-1b-headwise")


def test_an_unknown_alias_names_the_close_one_and_the_known():
    with pytest.raises(UnknownName, match="did you mean 'pair:osp-1.4b-muon'.*known: pair:osp-1.4b-adam"):
        classify("pair:osp-1.4b-mun")


def test_the_pairs_sweep_parses_and_every_model_resolves():
    config = SweepConfig.from_file(SWEEP)
    assert {"int8-w8a8-tensor", "int8-w8a8-token", "fp8-e4m3-w8a8-tensor", "int4-weight-g128"} <= set(config.quants)
    assert config.tasks == ("wikitext2",)
    assert all(classify(model) == "pairs" for model in config.models)
    families = {pair_names.published(model).family for model in config.models}
    baselines = {pair_names.published(m).family for m in config.models if pair_names.published(m).mitigation == "none"}
    assert baselines == families  # every family in the sweep brings its baseline


def test_list_models_shows_the_pairs(capsys):
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert "pair:osp-1.4b-muon" in out and "dmis-lab/OSP-1.4B-1T-Adam" in out
    assert "pair:gated-1b-headwise" in out and "needs remote code" in out

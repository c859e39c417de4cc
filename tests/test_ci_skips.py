""".ci/skips.py: a test skipped in every tox env, not for a GPU, fails CI."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "skips.py"


def load():
    spec = importlib.util.spec_from_file_location("ci_skips", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def junit(path: Path, cases: dict[str, str | None]) -> Path:
    """cases: test name -> None (ran) or its skip reason."""
    body = "".join(
        f'<testcase classname="tests.test_x" name="{name}">'
        + ("" if reason is None else f'<skipped type="pytest.skip" message="{reason}"/>') + "</testcase>"
        for name, reason in cases.items())
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return path


def test_a_test_skipped_everywhere_for_a_library_is_reported_and_gpu_tests_are_not(tmp_path, capsys):
    skips = load()
    py = junit(tmp_path / "py.xml", {"ran": None, "needs_ao": "needs torchao: pip install", "gpu": "needs a CUDA GPU",
                                     "nowhere": "needs ray: pip install ray",
                                     "ao_gpu": "needs torchao: pip install"})
    ao = junit(tmp_path / "torchao.xml", {"needs_ao": None, "ao_gpu": "needs a CUDA GPU"})
    assert list(skips.run_nowhere([py, ao])) == ["tests.test_x::nowhere"]
    assert skips.main([str(py), str(ao)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("1 test(s) ran in none of the envs (py, torchao):")
    assert "tests.test_x::nowhere: py: needs ray" in out
    # without the torchao env, its tests ran nowhere, GPU ones too: nothing says they would run on a GPU
    assert list(skips.run_nowhere([py])) == ["tests.test_x::ao_gpu", "tests.test_x::needs_ao", "tests.test_x::nowhere"]


def test_all_ran_is_exit_0_and_no_files_is_an_error(tmp_path, capsys):
    skips = load()
    assert skips.main([str(junit(tmp_path / "py.xml", {"a": None, "b": "needs a CUDA GPU"}))]) == 0
    assert "every collected test ran in some env (py)" in capsys.readouterr().out
    assert skips.main([]) == 2
    assert skips.main([str(tmp_path / "none.xml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_chromium_skip_counts_only_where_chromium_is_absent(tmp_path, monkeypatch):
    """.ci/run installs chromium from Debian's lists; where that failed the HTML test cannot run anywhere, which is
    the machine's lack, not a test no env runs. Where chromium is there, skipping it is a failure like any other."""
    import shutil

    py = junit(tmp_path / "py.xml", {"html": "needs chromium (apt-get install chromium)"})
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert list(load().run_nowhere([py])) == []
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    assert list(load().run_nowhere([py])) == ["tests.test_x::html"]

import logging
import os

from qharness.core.scoped import environment, logger_level


def test_environment_sets_only_what_is_unset_and_restores(monkeypatch):
    monkeypatch.setenv("QH_TEST_MINE", "user")
    monkeypatch.delenv("QH_TEST_NEW", raising=False)
    with environment(QH_TEST_MINE="ours", QH_TEST_NEW="ours"):
        assert os.environ["QH_TEST_MINE"] == "user" and os.environ["QH_TEST_NEW"] == "ours"
    assert os.environ["QH_TEST_MINE"] == "user" and "QH_TEST_NEW" not in os.environ


def test_logger_level_is_restored_after_an_error():
    logger = logging.getLogger("qh-test")
    logger.setLevel(logging.DEBUG)
    try:
        with logger_level("qh-test", logging.ERROR):
            assert logger.level == logging.ERROR
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert logger.level == logging.DEBUG

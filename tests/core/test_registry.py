import pytest

from qharness.core.errors import QHarnessError, UnknownName
from qharness.core.registry import Registry


def make() -> Registry:
    reg: Registry = Registry("widget")
    reg.add("int8-w8a8-token", 1, aliases=("int8",))
    reg.add("int4-weight-g128", 2)
    return reg


def test_get_by_name_and_alias():
    reg = make()
    assert reg.get("int8-w8a8-token") == 1
    assert reg.get("int8") == 1
    assert reg.resolve("int8") == "int8-w8a8-token"
    assert reg.names() == ["int4-weight-g128", "int8-w8a8-token"]
    assert reg.aliases_of("int8-w8a8-token") == ["int8"]


def test_unknown_name_suggests_close_matches_and_lists_all():
    with pytest.raises(UnknownName) as info:
        make().get("int9")
    message = str(info.value)
    assert message.startswith("unknown widget 'int9'; did you mean 'int8'")
    assert "known: int4-weight-g128, int8, int8-w8a8-token" in message


def test_unknown_name_is_a_key_error_too():
    with pytest.raises(KeyError):
        make().get("nothing-like-it")


def test_duplicate_name_or_alias_names_both_owners():
    reg = make()
    with pytest.raises(QHarnessError, match="widget name 'int8' registered twice: by builtins and by builtins"):
        reg.add("int8", 3)
    with pytest.raises(QHarnessError, match="registered twice"):
        reg.add("other", 3, aliases=("int4-weight-g128",))

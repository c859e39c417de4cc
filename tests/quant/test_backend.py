import pytest
import torch

from qharness.errors import BackendUnavailable
from qharness.quant import backend as backend_module
from qharness.quant.apply import quantize_
from qharness.quant.backend import load_backends, select_backend
from qharness.quant.schemes import SCHEMES, Keep, get_scheme

CPU = torch.device("cpu")


class FakeCuda:
    type = "cuda"


def test_every_registered_backend_is_listed():
    assert {"sim", "bnb", "torchao"} <= set(load_backends().names())


def test_auto_on_cpu_is_sim_whenever_sim_implements_the_scheme():
    for name in ("int8", "int4", "fp8", "llm-int8", "nf4", "int8-w8a8-tensor-static"):
        assert select_backend(get_scheme(name), CPU) == "sim"


def test_auto_on_cuda_prefers_library_kernels(monkeypatch):
    monkeypatch.setattr(backend_module.Backend, "check", lambda self, device, scheme=None: None)
    assert select_backend(get_scheme("llm-int8"), FakeCuda()) == "bnb"
    assert select_backend(get_scheme("int8"), FakeCuda()) == "torchao"
    assert select_backend(get_scheme("int8-w8a8-tensor"), FakeCuda()) == "sim"  # no library implements it


def test_explicit_backend_must_implement_the_scheme():
    with pytest.raises(BackendUnavailable, match="backend 'bnb' does not implement scheme 'int8-w8a8-tensor'; "
                                                 "its backends: sim"):
        select_backend(get_scheme("int8-w8a8-tensor"), CPU, "bnb")


def test_missing_library_names_the_install_command(monkeypatch):
    monkeypatch.setattr(backend_module, "_installed", lambda package: package != "bitsandbytes")
    with pytest.raises(BackendUnavailable, match="backend 'bnb' needs bitsandbytes: pip install -c constraints.txt "
                                                 "bitsandbytes"):
        select_backend(get_scheme("nf4"), CPU, "bnb")


@pytest.mark.needs("torchao")
def test_torchao_fp8_dynamic_on_cpu_says_what_would_work():
    with pytest.raises(BackendUnavailable, match=r"needs a CUDA GPU of compute capability >= 8.9, not cpu; "
                                                 r"use --backend sim"):
        select_backend(get_scheme("fp8"), CPU, "torchao")


def test_keep_needs_a_backend_that_supports_it(tiny_model, monkeypatch):
    monkeypatch.setattr(backend_module.Backend, "check", lambda self, device, scheme=None: None)
    with pytest.raises(BackendUnavailable, match="backend 'bnb' cannot keep token positions or channels"):
        quantize_(tiny_model, get_scheme("nf4"), backend="bnb", keep=Keep(positions=(0,)))


def test_schemes_and_backends_agree_on_who_implements_what():
    backends = load_backends()
    for scheme_name in SCHEMES.names():
        for backend_name in get_scheme(scheme_name).backends:
            implemented = backends.get(backend_name).schemes
            assert implemented is None or scheme_name in implemented, (scheme_name, backend_name)
    for entry in backends:
        for scheme_name in entry.obj.schemes or ():
            assert entry.name in get_scheme(scheme_name).backends, (entry.name, scheme_name)


def test_backend_refuses_a_scheme_outside_its_list():
    from qharness.quant.backend import Backend

    narrow = Backend(name="narrow", description="", apply=lambda *a: None, schemes=("nf4",))
    with pytest.raises(BackendUnavailable, match="backend 'narrow' implements nf4, not 'int8-w8a8-token'"):
        narrow.check(CPU, get_scheme("int8"))

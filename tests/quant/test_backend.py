import pytest
import torch

from qharness.core.errors import BackendUnavailable
from qharness.quant import backends as backend_module
from qharness.quant.apply import quantize_
from qharness.quant.backends import Backend, Capability, backends_for, load_backends, recipe, select_backend
from qharness.quant.schemes import SCHEMES, Keep, get_scheme

CPU = torch.device("cpu")


class FakeCuda:
    type = "cuda"


def linears(*shapes: tuple[int, int]) -> dict[str, torch.nn.Linear]:
    """Targets of the given (in, out) widths, as `select_backend(targets=...)` sees a model."""
    return {f"layers.{i}.proj": torch.nn.Linear(i_f, o_f) for i, (i_f, o_f) in enumerate(shapes)}


@pytest.fixture()
def h100(monkeypatch):
    """A CUDA device of compute capability 9.0 with every library installed and every build tool present: each
    test then takes away the one thing it checks."""
    monkeypatch.setattr(backend_module, "_installed", lambda package: True)
    monkeypatch.setattr(backend_module, "compute_capability", lambda device: (9, 0))
    monkeypatch.setattr(backend_module, "TOOLS", {name: (lambda: True, hint)
                                                  for name, (_, hint) in backend_module.TOOLS.items()})
    return FakeCuda()


def test_every_registered_backend_is_listed():
    assert {"sim", "bnb", "torchao", "gptq", "quanto"} <= set(load_backends().names())


def test_list_backends_reads_the_same_attributes_as_before():
    # cli.py's `qharness list backends` prints description, requires and devices
    torchao = load_backends().get("torchao")
    assert torchao.devices == ("cpu", "cuda") and torchao.requires == ("torchao",) and torchao.description
    assert load_backends().get("sim").devices == ("cpu", "cuda")


def test_scheme_backends_come_from_the_backends_tables():
    for name in SCHEMES.names():
        scheme = get_scheme(name)
        declared = tuple(entry.name for entry in load_backends() if entry.obj.runs(scheme))
        assert backends_for(scheme) and sorted(backends_for(scheme)) == sorted(declared), name
    assert backends_for(get_scheme("llm-int8-bnb")) == ("bnb", "sim")  # most preferred on CUDA first, sim last
    assert backends_for(get_scheme("llm-int8")) == ("sim",)  # bitsandbytes' outlier rule is llm-int8-bnb's
    # torchao's int8 is amax/127.5: it runs the schemes named for that grid, not amax/127's
    assert backends_for(get_scheme("int8-weight-channel")) == ("quanto", "sim")
    assert backends_for(get_scheme("int8-weight-channel-halfspan")) == ("torchao", "sim")
    assert backends_for(get_scheme("gptq")) == ("gptq",)  # sim does not pass round-to-nearest off as GPTQ
    assert backends_for(get_scheme("int8-w8a8-tensor")) == ("sim",)
    assert backends_for(get_scheme("mxfp8-w8a8")) == ("torchao", "sim")
    assert backends_for(get_scheme("mxfp4-weight")) == ("sim",)  # torchao 0.18 has no MX weight-only config


def test_auto_on_cpu_is_sim_whenever_sim_implements_the_scheme():
    for name in ("int8", "int4", "fp8", "llm-int8", "nf4", "int8-w8a8-tensor-static"):
        assert select_backend(get_scheme(name), CPU) == "sim"


def test_auto_on_cuda_prefers_library_kernels(h100):
    assert select_backend(get_scheme("llm-int8-bnb"), h100) == "bnb"
    assert select_backend(get_scheme("llm-int8"), h100) == "sim"  # no kernel computes the paper's rule
    assert select_backend(get_scheme("int8-w8a8-token-halfspan"), h100) == "torchao"
    assert select_backend(get_scheme("int8"), h100) == "sim"  # torchao's int8 grid is another scheme's
    assert select_backend(get_scheme("fp8-e4m3-weight"), h100, dtype=torch.bfloat16) == "torchao"
    assert select_backend(get_scheme("int8-w8a8-tensor"), h100) == "sim"  # no library implements it



def _block_scaled_mm_on_meta(scheme: str, m: int, k: int, n: int) -> None:
    """torch._scaled_mm on meta tensors shaped as torchao 0.18 hands them over for `scheme` (mx_tensor.py,
    nvfp4_tensor.py: row-major activations, the transposed weight column-major, swizzled block scales). On meta,
    torch runs its size checks for CUDA (_meta_registrations._check_scaled_mm_sizes: device_hint(meta) is cuda),
    the ones Blas.cpp makes on the GPU."""
    def ceil_div(a: int, b: int) -> int:
        return -(-a // b)

    fp4 = scheme != "mxfp8-w8a8"
    element = torch.float4_e2m1fn_x2 if fp4 else torch.float8_e4m3fn
    width = k // 2 if fp4 else k  # two FP4 values a byte
    a = torch.empty(m, width, dtype=torch.uint8, device="meta").view(element)
    b = torch.empty(n, width, dtype=torch.uint8, device="meta").view(element).t()
    block, scale = (16, torch.float8_e4m3fn) if scheme == "nvfp4-w4a4" else (32, torch.float8_e8m0fnu)
    k_blocks = ceil_div(ceil_div(k, block), 4) * 4
    scale_a = torch.empty(128 * ceil_div(m, 128) * k_blocks, dtype=scale, device="meta")
    scale_b = torch.empty(128 * ceil_div(n, 128) * k_blocks, dtype=scale, device="meta")
    torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=torch.bfloat16)


@pytest.mark.parametrize("scheme", ["mxfp8-w8a8", "mxfp4-w4a4", "nvfp4-w4a4"])
def test_widths_declared_for_block_scaled_kernels_are_widths_scaled_mm_takes(h100, monkeypatch, scheme):
    """NVFP4 W4A4 with an input width of 48 (whole blocks of 16, a multiple of 16) was accepted, and would have
    failed in the first matmul on a Blackwell GPU: torch checks the packed FP4 operand's bytes, 48 / 2 = 24, against
    16 ("Expected self.size(1) to be divisible by 16, but got self.size(1)=24")."""
    monkeypatch.setattr(backend_module, "compute_capability", lambda device: (10, 0))
    torchao = load_backends().get("torchao")
    for k in (16, 32, 48, 64, 96, 576):
        for n in (16, 48, 64, 192):
            try:
                torchao.check(h100, get_scheme(scheme), torch.bfloat16, linears((k, n)))
            except BackendUnavailable:
                continue
            _block_scaled_mm_on_meta(scheme, 8, k, n)  # declared runnable: torch must take these widths
    with pytest.raises(BackendUnavailable, match=r"input widths divisible by 32 .*layers.0.proj has 48"):
        torchao.check(h100, get_scheme("nvfp4-w4a4"), torch.bfloat16, linears((48, 64)))

def test_microscaling_kernels_need_blackwell_so_auto_runs_sim_on_h100(h100):
    for name in ("mxfp8-w8a8", "mxfp4-w4a4", "nvfp4-w4a4"):
        assert select_backend(get_scheme(name), h100, dtype=torch.bfloat16) == "sim"
        with pytest.raises(BackendUnavailable, match=rf"^backend 'torchao' runs '{name}' on cuda with compute "
                                                     r"capability >= 10.0, not 9.0; use --backend sim"):
            select_backend(get_scheme(name), h100, "torchao", dtype=torch.bfloat16)
    # NVFP4 weight-only dequantizes before an ordinary matmul: any CUDA device
    assert select_backend(get_scheme("nvfp4-weight"), h100, dtype=torch.bfloat16) == "torchao"
    assert select_backend(get_scheme("mxfp8-w8a8"), CPU, "sim") == "sim"
    with pytest.raises(BackendUnavailable, match=r"^backend 'torchao' runs 'nvfp4-weight' on cuda, not cpu"):
        select_backend(get_scheme("nvfp4-weight"), CPU, "torchao")


def test_auto_on_cuda_falls_back_to_sim_when_torchao_declines_the_model(h100):
    tinygemm = get_scheme("int4-weight-g128-tinygemm")
    assert select_backend(tinygemm, h100, dtype=torch.bfloat16, targets=linears((128, 64), (256, 128))) == "torchao"
    assert select_backend(tinygemm, h100, dtype=torch.bfloat16, targets=linears((128, 64), (576, 128))) == "sim"
    assert select_backend(tinygemm, h100, dtype=torch.float32, targets=linears((128, 64))) == "sim"  # bf16 only
    # the integer-zero-point scheme is torchao's dequantize + matmul: any dtype, the same arithmetic as sim
    assert select_backend(get_scheme("int4"), h100, dtype=torch.float32, targets=linears((128, 64))) == "torchao"
    fp8_token = get_scheme("fp8-e4m3-w8a8-token")
    assert select_backend(fp8_token, h100, dtype=torch.float16) == "sim"
    assert select_backend(fp8_token, h100, dtype=torch.bfloat16, targets=linears((72, 64))) == "sim"  # not x16


def test_explicit_backend_must_implement_the_scheme():
    with pytest.raises(BackendUnavailable, match="^backend 'bnb' does not implement scheme 'int8-w8a8-tensor'; "
                                                 "its backends: sim$"):
        select_backend(get_scheme("int8-w8a8-tensor"), CPU, "bnb")


def test_missing_library_names_the_install_command(monkeypatch):
    monkeypatch.setattr(backend_module, "_installed", lambda package: package != "bitsandbytes")
    with pytest.raises(BackendUnavailable, match="backend 'bnb' needs bitsandbytes: pip install -c constraints.txt "
                                                 "bitsandbytes"):
        select_backend(get_scheme("nf4"), CPU, "bnb")


def test_cuda_only_scheme_on_cpu_says_what_would_work(monkeypatch):
    monkeypatch.setattr(backend_module, "_installed", lambda package: True)
    with pytest.raises(BackendUnavailable, match=r"^backend 'torchao' runs 'fp8-e4m3-w8a8-tensor' on cuda, not cpu; "
                                                 r"use --backend sim \(same math, any device\)$"):
        select_backend(get_scheme("fp8"), CPU, "torchao")


def test_old_gpu_is_refused_with_the_capability_it_needs(h100, monkeypatch):
    monkeypatch.setattr(backend_module, "compute_capability", lambda device: (8, 6))
    with pytest.raises(BackendUnavailable, match=r"^backend 'torchao' runs 'fp8-e4m3-w8a8-tensor' on cuda with "
                                                 r"compute capability >= 8.9, not 8.6; use --backend sim"):
        select_backend(get_scheme("fp8"), h100, "torchao")
    monkeypatch.setattr(backend_module, "compute_capability", lambda device: (7, 5))
    with pytest.raises(BackendUnavailable, match=r"'int4-weight-g128-tinygemm' on cuda with compute capability "
                                                 r">= 8.0, not 7.5"):
        select_backend(get_scheme("int4-weight-g128-tinygemm"), h100, "torchao")


@pytest.mark.parametrize(("scheme", "backend", "dtype", "message"), [
    ("int4-weight-g128-tinygemm", "torchao", torch.float32,
     r"^backend 'torchao' runs 'int4-weight-g128-tinygemm' on cuda in bf16 only, not fp32; pass --dtype bf16 or use "
     r"--backend sim \(same math, any device\)$"),
    ("fp8-e4m3-w8a8-token", "torchao", torch.float16,
     r"^backend 'torchao' runs 'fp8-e4m3-w8a8-token' on cuda in bf16 only, not fp16; pass --dtype bf16 or use "
     r"--backend sim"),
    ("gptq", "gptq", torch.float32,
     r"^backend 'gptq' runs 'gptq-int4-g128' on cuda in bf16 or fp16 only, not fp32; pass --dtype bf16 or use "
     r"--device cpu$"),
])
def test_dtype_the_kernel_cannot_take_is_refused_up_front(h100, scheme, backend, dtype, message):
    with pytest.raises(BackendUnavailable, match=message):
        select_backend(get_scheme(scheme), h100, backend, dtype=dtype)
    select_backend(get_scheme(scheme), h100, backend)  # dtype unknown (the runner's plan): not refused yet


def test_dtype_limits_are_per_device(monkeypatch):
    # the same schemes in fp32 on CPU: IntxWeightOnly and gptqmodel's CPU path take it (the check, not the library)
    monkeypatch.setattr(backend_module, "_installed", lambda package: True)
    assert select_backend(get_scheme("int4"), CPU, "torchao", dtype=torch.float32) == "torchao"


def test_ragged_widths_name_the_layer_and_the_fallback(h100):
    with pytest.raises(BackendUnavailable, match=r"^backend 'torchao' runs 'int4-weight-g128-tinygemm' on input "
                                                 r"widths divisible by 128; layers.1.proj has 576; use --backend sim"):
        select_backend(get_scheme("int4-weight-g128-tinygemm"), h100, "torchao", torch.bfloat16,
                       linears((128, 64), (576, 128)))
    with pytest.raises(BackendUnavailable, match=r"^backend 'torchao' runs 'fp8-e4m3-w8a8-tensor' on widths "
                                                 r"divisible by 16; layers.0.proj is 72x64; use --backend sim"):
        select_backend(get_scheme("fp8"), h100, "torchao", torch.bfloat16, linears((72, 64)))


def test_quanto_fp8_on_cuda_without_a_compiler_says_what_to_install(h100, monkeypatch):
    tools = dict(backend_module.TOOLS, nvcc=(lambda: False, backend_module.TOOLS["nvcc"][1]))
    monkeypatch.setattr(backend_module, "TOOLS", tools)
    with pytest.raises(BackendUnavailable, match=r"^backend 'quanto' runs 'fp8-e4m3-weight' on cuda with a kernel it "
                                                 r"compiles at first use, which needs nvcc \(not found\): install the "
                                                 r"CUDA toolkit \(nvcc\) and set CUDA_HOME; or use --backend "
                                                 r"torchao or --backend sim"):
        select_backend(get_scheme("fp8-e4m3-weight"), h100, "quanto", dtype=torch.bfloat16)
    assert select_backend(get_scheme("int8-weight-channel"), h100, "quanto") == "quanto"  # int8: no build


def test_no_backend_at_all_lists_every_reason(h100):
    with pytest.raises(BackendUnavailable, match=r"^no backend can run scheme 'gptq-int4-g128' on cuda: backend "
                                                 r"'gptq' runs 'gptq-int4-g128' on cuda in bf16 or fp16 only"):
        select_backend(get_scheme("gptq"), h100, dtype=torch.float32)


def test_keep_needs_a_backend_that_supports_it(tiny_model, monkeypatch):
    monkeypatch.setattr(backend_module, "_installed", lambda package: True)
    with pytest.raises(BackendUnavailable, match="backend 'bnb' cannot keep token positions or channels"):
        quantize_(tiny_model, get_scheme("nf4"), backend="bnb", keep=Keep(positions=(0,)))


def test_a_backend_outside_its_table_is_refused_and_a_recipe_miss_is_an_error():
    narrow = Backend(name="narrow", description="", apply=lambda *a: None,
                     capabilities={"nf4": (Capability("cpu"),)})
    assert narrow.schemes == ("nf4",) and narrow.devices == ("cpu",)
    with pytest.raises(BackendUnavailable, match="^backend 'narrow' does not implement scheme 'int8-w8a8-token'; "
                                                 "its backends: sim$"):
        narrow.check(CPU, get_scheme("int8"))
    with pytest.raises(BackendUnavailable, match="^backend 'bnb' does not implement scheme 'int4-weight-g128'; "
                                                 "it implements llm-int8, nf4$"):
        recipe({"llm-int8": 1, "nf4": 2}, "bnb", get_scheme("int4"))


def test_backends_for_orders_by_preference():
    assert backends_for(get_scheme("fp8-e4m3-weight")) == ("torchao", "quanto", "sim")


def test_a_scheme_the_backend_lacks_is_named_before_a_missing_library(monkeypatch):
    monkeypatch.setattr(backend_module, "_installed", lambda package: False)
    with pytest.raises(BackendUnavailable, match="^backend 'bnb' does not implement scheme 'int8-w8a8-tensor'"):
        select_backend(get_scheme("int8-w8a8-tensor"), CPU, "bnb")


def test_torchao_fp8_per_tensor_refuses_a_128x128_weight_it_would_misread(h100):
    """torchao 0.18 records a per-tensor scale's block as the weight's shape, and a 128x128 block means block
    scaling to its matmul: the run asserted mid-way on an H200. Refused before any weight moves; auto runs sim."""
    fp8 = get_scheme("fp8-e4m3-w8a8-tensor")
    with pytest.raises(BackendUnavailable, match=r"^backend 'torchao' cannot run 'fp8-e4m3-w8a8-tensor' on a 128x128 "
                                                 r"weight \(layers.1.proj\): torchao 0.18 reads its per-tensor scale "
                                                 r"as a 128x128 block scale .*; use --backend sim"):
        select_backend(fp8, h100, "torchao", dtype=torch.bfloat16, targets=linears((128, 256), (128, 128)))
    assert select_backend(fp8, h100, dtype=torch.bfloat16, targets=linears((128, 128))) == "sim"
    assert select_backend(fp8, h100, dtype=torch.bfloat16, targets=linears((128, 256), (256, 128))) == "torchao"
    # per row the block is (1, in): never misread
    assert select_backend(get_scheme("fp8-e4m3-w8a8-token"), h100, dtype=torch.bfloat16,
                          targets=linears((128, 128))) == "torchao"


def test_auto_prefers_a_backend_that_needs_no_build_and_a_build_is_announced(h100):
    from qharness.quant.backends import backend_note

    fp8_weight = get_scheme("fp8-e4m3-weight")  # quanto (Marlin, compiled at first use) and torchao run it on CUDA
    assert select_backend(fp8_weight, h100, dtype=torch.bfloat16) == "torchao"
    note = backend_note("quanto", fp8_weight, h100)
    assert note.startswith("quanto compiles its kernel for 'fp8-e4m3-weight' at first use (quanto's Marlin fp8 "
                           "kernel, typically several minutes")
    assert backend_note("torchao", fp8_weight, h100) is None
    # auto on CUDA running sim says that these are simulated numbers
    assert "running sim, the reference arithmetic" in backend_note("sim", get_scheme("int8-w8a8-tensor"), h100)
    assert backend_note("sim", get_scheme("int8-w8a8-tensor"), h100, requested="sim") is None
    assert backend_note("sim", get_scheme("int8-w8a8-tensor"), CPU) is None

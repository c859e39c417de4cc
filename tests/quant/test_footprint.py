import torch

from qharness.quant.footprint import weight_bytes
from qharness.quant.schemes import get_scheme


def test_bytes_per_format_and_granularity():
    linears = {"a": torch.nn.Linear(300, 10, bias=False)}  # 3000 weights, fp32
    assert weight_bytes(linears, None) == 12000
    assert weight_bytes(linears, get_scheme("fp8-e4m3-w8a8-tensor")) == 3000 + 4  # one scale
    assert weight_bytes(linears, get_scheme("int8")) == 3000 + 10 * 4  # one scale per output channel
    assert weight_bytes(linears, get_scheme("int4")) == 1500 + 10 * 3 * 5  # 3 groups (128,128,44) x (scale + zero)
    assert weight_bytes(linears, get_scheme("nf4")) == 1500 + 10 * 5 * 4  # blocks of 64: 5 per row
    assert weight_bytes(linears, get_scheme("int8-w8a8-tensor")) < weight_bytes(linears, None) / 3.9
    assert weight_bytes(linears, get_scheme("int4-w4a8-token-g128")) == 1500 + 10 * 3 * 4  # symmetric: no zero
    # microscaling: one byte per block (E8M0 or E4M3), NVFP4 plus one fp32 scale per tensor
    assert weight_bytes(linears, get_scheme("mxfp8-w8a8")) == 3000 + 10 * 10  # blocks of 32: 10 per row
    assert weight_bytes(linears, get_scheme("mxfp4-weight")) == 1500 + 10 * 10
    assert weight_bytes(linears, get_scheme("nvfp4-weight")) == 1500 + 10 * 19 + 4  # blocks of 16: 19 per row

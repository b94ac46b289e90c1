"""The CUDA W8A16 GEMV's configurations (csrc/int8_cuda.cu): R channels a warp, K split across a
block's warps, partial last blocks, and channels whose scale takes the float path inside a group of
R. GPU only; compared with ``int8_linear_ref`` (weight-only) at the tolerances of tests/test_int8.py."""

from __future__ import annotations

import pytest
import torch

from tape_kernels import int8 as i8

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("n, k", [(8192, 4096), (4100, 1040), (1024, 8192), (256, 2048), (768, 256)],
                         ids=["R4-splitK", "R4-partial", "R1-splitK8", "R1-splitK2", "small"])
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gemv_configs_match_reference(n: int, k: int, m: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=gen)
    q, s = i8.quantize_weight(w)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    y = i8.int8_linear(x.cuda(), q.cuda(), s.cuda(), b.cuda(), act_quant=False).float().cpu()
    ref = i8.int8_linear_ref(x.float(), q, s, b.float(), act_quant=False)
    scale = ref.abs().max()
    assert float((y - ref).abs().max() / scale) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 3])
def test_float_path_channel_inside_a_group(m: int) -> None:
    """An inf and a huge scale among the R channels of one warp give F.linear(x, q·s, b)'s values;
    their neighbours are unaffected."""
    n, k = 8192, 1024
    gen = torch.Generator().manual_seed(0)
    q, s = i8.quantize_weight(torch.randn(n, k, generator=gen))
    s[5] = float("inf")
    s[6] = 3e37
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen)
    y = i8.int8_linear(x.cuda(), q.cuda(), s.cuda(), b.cuda(), act_quant=False).cpu()
    want = torch.nn.functional.linear(x, q.float() * s[:, None], b)
    assert torch.equal(y[:, 5].isnan(), want[:, 5].isnan()) and torch.equal(y[:, 5].isinf(), want[:, 5].isinf())
    fin = torch.isfinite(want)
    torch.testing.assert_close(y[fin], want[fin], rtol=1e-4, atol=1e-4)

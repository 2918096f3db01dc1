"""The fused (torch.compile) Q/K chunk gives the eager twin's numbers."""
import pytest
import torch

from kernels.qk_impact import AttentionSpec, HeadNorm, qk_impact_torch


@pytest.mark.parametrize("softcap,norm", [(None, False), (4.0, True)])
def test_compiled_equals_eager(monkeypatch, softcap, norm):
    gen = torch.Generator().manual_seed(7)
    b, t, hq, hk, d = 3, 11, 4, 2, 10
    q, k, v = (torch.randn(b, t, n * d, generator=gen) for n in (hq, hk, hk))
    cos, sin = torch.randn(1, t, d, generator=gen), torch.randn(1, t, d, generator=gen)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 7:] = False
    hn = HeadNorm(torch.rand(d, generator=gen) + 0.5, 1e-6) if norm else None
    spec = AttentionSpec(hq, hk, d, d ** -0.5, softcap, 5, hn, hn)
    monkeypatch.setenv("NEUROLANG_COMPILE", "0")
    eager = qk_impact_torch(q, k, v, cos, sin, mask, spec)
    monkeypatch.setenv("NEUROLANG_COMPILE", "1")
    fused = qk_impact_torch(q, k, v, cos, sin, mask, spec)
    for a, e in zip(fused, eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)

"""The fused (torch.compile) Q/K chunk gives the eager twin's numbers, and the float64 reference's."""
import pytest
import torch

from kernels.qk_impact import AttentionSpec, HeadNorm, _expm1_, qk_impact_reference, qk_impact_torch


def test_compiled_expm1_keeps_every_digit_of_small_arguments():
    """torch.compile's CPU code computes torch.expm1 as exp(x) − 1 (PyTorch 2.13,
    pytorch/pytorch#189803), 0 below 6e-8; the twin's `_expm1_` does not."""
    x = torch.logspace(-12, 1.5, 300)
    x = torch.cat([x, -x, -torch.logspace(1.5, 2.5, 20), torch.zeros(1)])
    got = torch.compile(_expm1_)(x.clone())
    torch.testing.assert_close(got.double(), torch.expm1(x.double()), rtol=2e-7, atol=0)


@pytest.mark.parametrize("softcap,norm", [(None, False), (4.0, True)])
@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_compiled_equals_eager_and_float64(monkeypatch, softcap, norm, scale):
    """At scale 0.01 each channel moves the logits by about 1e-5: exp(x) − 1 kept 1 to 3 digits."""
    gen = torch.Generator().manual_seed(7)
    b, t, hq, hk, d = 3, 11, 4, 2, 10
    q, k, v = (torch.randn(b, t, n * d, generator=gen, dtype=torch.float64) for n in (hq, hk, hk))
    q, k = q * scale, k * scale
    cos, sin = torch.randn(1, t, d, generator=gen, dtype=torch.float64), torch.randn(1, t, d, generator=gen,
                                                                                    dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 7:] = False
    hn = HeadNorm(torch.rand(d, generator=gen, dtype=torch.float64) + 0.5, 1e-6) if norm else None
    spec = AttentionSpec(hq, hk, d, d ** -0.5, softcap, 5, hn, hn)
    reference = qk_impact_reference(q, k, v, cos, sin, mask, spec)
    f32 = [x.float() for x in (q, k, v, cos, sin)]
    monkeypatch.setenv("NEUROLANG_COMPILE", "0")
    eager = qk_impact_torch(*f32, mask, spec)
    monkeypatch.setenv("NEUROLANG_COMPILE", "1")
    fused = qk_impact_torch(*f32, mask, spec)
    for a, e, r in zip(fused, eager, reference):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7 * float(e.max()))
        # As tests/test_qk_impact.py holds the eager twin: 1e-5 relative, or 1e-7 of the largest.
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-7 * float(r.max()))

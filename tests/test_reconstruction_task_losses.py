"""DetectionDivergence: the detectors' label-free Fisher loss (ClassificationKL is tested
with the objective in test_reconstruction_objective.py)."""
import pytest
import torch
from torch.nn import functional as F

from mmbrecq.reconstruction import DetectionDivergence
from mmbrecq.registry import TASK_LOSSES, build_from


def _outs(seed, shift=0.):
    g = torch.Generator().manual_seed(seed)
    levels = [(2, 6, 4, 4), (2, 6, 2, 2)]
    return {
        'cls': dict(kind='sigmoid', values=[torch.randn(s, generator=g) + shift for s in levels]),
        'reg': dict(kind='l2', values=[torch.randn(s, generator=g) + shift for s in levels]),
        'roi_cls': dict(kind='softmax', values=[torch.randn(8, 5, generator=g) + shift]),
    }


def test_registered_and_built_from_config():
    assert isinstance(build_from(TASK_LOSSES, dict(type='DetectionDivergence')), DetectionDivergence)


def test_zero_for_identical_outputs_positive_otherwise():
    loss = DetectionDivergence()
    assert float(loss(_outs(0), _outs(0))) == pytest.approx(0, abs=1e-5)
    assert float(loss(_outs(0), _outs(1))) > 0.1


def test_each_kind_matches_its_reference_formula():
    loss = DetectionDivergence()
    q, f = torch.randn(3, 4), torch.randn(3, 4)
    # binary KL(f || q) of Bernoulli(sigmoid(.)), summed
    pf, pq = torch.sigmoid(f), torch.sigmoid(q)
    bkl = (pf * (pf / pq).log() + (1 - pf) * ((1 - pf) / (1 - pq)).log()).sum()
    got = loss({'a': dict(kind='sigmoid', values=[q])}, {'a': dict(kind='sigmoid', values=[f])})
    assert float(got) == pytest.approx(float(bkl), rel=1e-4)
    kl = (F.softmax(f, 1) * (F.log_softmax(f, 1) - F.log_softmax(q, 1))).sum()
    got = loss({'a': dict(kind='softmax', values=[q])}, {'a': dict(kind='softmax', values=[f])})
    assert float(got) == pytest.approx(float(kl), rel=1e-4)
    got = loss({'a': dict(kind='l2', values=[q])}, {'a': dict(kind='l2', values=[f])})
    assert float(got) == pytest.approx(float(0.5 * (q - f).pow(2).sum()), rel=1e-5)


def test_softmax_kl_is_shift_invariant_sigmoid_is_not():
    loss = DetectionDivergence()
    x = torch.randn(4, 6)
    soft = lambda t: {'a': dict(kind='softmax', values=[t])}  # noqa: E731
    sig = lambda t: {'a': dict(kind='sigmoid', values=[t])}  # noqa: E731
    assert float(loss(soft(x + 3), soft(x))) == pytest.approx(0, abs=1e-4)
    assert float(loss(sig(x + 3), sig(x))) > 1


def test_gradient_reaches_every_output_and_sums_over_samples():
    loss = DetectionDivergence()
    q = _outs(0, shift=0.3)
    leaves = [v for o in q.values() for v in o['values']]
    for v in leaves:
        v.requires_grad_(True)
    grads = torch.autograd.grad(loss(q, _outs(0)), leaves)
    assert all(g.abs().sum() > 0 for g in grads)
    # summed over samples: one image's gradient does not depend on its batch mates
    one = {k: dict(kind=o['kind'], values=[v[:1].detach().requires_grad_(True) for v in o['values']])
           for k, o in list(q.items())[:2]}
    f = {k: dict(kind=o['kind'], values=[v[:1] for v in o['values']]) for k, o in list(_outs(0).items())[:2]}
    g1 = torch.autograd.grad(loss(one, f), [v for o in one.values() for v in o['values']])
    assert torch.allclose(g1[0], grads[0][:1], atol=1e-6)


def test_weights_scale_an_output_and_unknown_names_are_errors():
    q, f = _outs(0, shift=0.5), _outs(0)
    base, only_cls = DetectionDivergence()(q, f), DetectionDivergence(dict(reg=0, roi_cls=0))(q, f)
    doubled = DetectionDivergence(dict(cls=2.0, reg=0, roi_cls=0))(q, f)
    assert float(doubled) == pytest.approx(2 * float(only_cls), rel=1e-5) and float(base) > float(only_cls)
    with pytest.raises(ValueError, match="'rpn_cls'"):
        DetectionDivergence(dict(rpn_cls=1.0))(q, f)
    with pytest.raises(TypeError, match='detection_forward'):
        DetectionDivergence()(torch.zeros(2), torch.zeros(2))

"""A non-finite loss names where the NaN comes from: a NaN downstream of a unit makes that
unit's Fisher weights NaN first, so the failing unit is not where the NaN is."""
import pytest
import torch
from torch import nn

import mmbrecq
from mmbrecq.reconstruction import NonFiniteLoss

torch.set_num_threads(1)

FAST = dict(w_bits=4, a_bits=4, weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
            act_quantizer=dict(type='LSQQuantizer', init='minmax'))


def _model(nan_at):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    with torch.no_grad():
        model[nan_at].weight[0].view(-1)[0] = float('nan')
    return mmbrecq.quantize_model(model, FAST)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


@pytest.mark.parametrize('nan_at,origin', [(5, 'Fisher weights are not finite (the cause is downstream'),
                                           (0, 'float output target is not finite')])
def test_nonfinite_loss_says_where_the_nan_is(nan_at, origin):
    with pytest.raises(NonFiniteLoss) as e:
        mmbrecq.reconstruct(_model(nan_at), _batches(), dict(iters=3, batch_size=4, progress=False,
                                                              loss='fisher_diag', on_nan='fail'))
    msg = str(e.value)
    assert msg.startswith("unit '0'")  # the first unit fails in both cases ...
    assert origin in msg  # ... and the message says where to look

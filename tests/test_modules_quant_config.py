"""QuantConfig: validation errors that name the offending key, and per-layer bit decisions."""
import copy
import re

import pytest
import torch
from torch import nn

from mmbrecq import quantize_model
from mmbrecq.config import DEFAULTS
from mmbrecq.modules import QuantConfig, QuantLayerMixin, quantizers_of

torch.set_num_threads(1)

FAST = dict(weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
            act_quantizer=dict(type='LSQQuantizer', init='minmax'))


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),  # 0 1 2
        nn.Conv2d(4, 4, 3), nn.ReLU(),  # 3 4
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),  # 5 6 7
    ).eval()


def _cfg(**kwargs):
    return dict(FAST, **kwargs)


# ---------------------------------------------------------------------------------------
# top-level keys
# ---------------------------------------------------------------------------------------
def test_defaults_are_applied_and_not_shared():
    q = QuantConfig(dict(w_bits=2))
    assert q.w_bits == 2 and q.a_bits == DEFAULTS['a_bits'] == 4
    assert q.keep_8bit == ['first', 'last'] and q.skip == [] and q.overrides == []
    assert q['fold_bn'] is True and q['weight_quantizer']['type'] == 'AdaRoundQuantizer'
    q['weight_quantizer']['p'] = 99.0
    q.keep_8bit.append('x')
    assert DEFAULTS['weight_quantizer']['p'] == 2.4
    assert DEFAULTS['keep_8bit'] == ['first', 'last']
    assert QuantConfig({}).keep_8bit == ['first', 'last']


def test_user_dict_is_not_mutated():
    user = dict(w_bits=4, overrides=[dict(pattern='a', w_bits=8)])
    snapshot = copy.deepcopy(user)
    q = QuantConfig(user)
    q.overrides[0]['w_bits'] = 2
    q['overrides'][0]['w_bits'] = 2
    assert user == snapshot


def test_unknown_key_raises_naming_it():
    with pytest.raises(ValueError, match='w_bit_width') as e:
        QuantConfig(dict(w_bits=4, w_bit_width=4))
    assert 'quant_cfg' in str(e.value)
    with pytest.raises(ValueError, match="'typo'"):
        QuantConfig(dict(typo=1))


def test_missing_quant_cfg_raises_mentioning_quant_cfg():
    with pytest.raises(ValueError, match='quant_cfg'):
        QuantConfig(None)
    with pytest.raises(ValueError, match='quant_cfg'):
        quantize_model(_small_model(), None)


@pytest.mark.parametrize('key,value', [
    ('w_bits', 1), ('w_bits', '4'), ('w_bits', 32), ('w_bits', None), ('w_bits', 4.0),
    ('w_bits', True), ('a_bits', 9), ('a_bits', 0), ('a_bits', '8'), ('a_bits', 1),
])
def test_bits_out_of_range_raise_naming_the_key(key, value):
    with pytest.raises(ValueError, match=re.escape(f'quant_cfg.{key}={value!r}')):
        QuantConfig({key: value})


@pytest.mark.parametrize('bits', [2, 3, 4, 5, 6, 7, 8, 16])
def test_valid_bits_accepted(bits):
    q = QuantConfig(dict(w_bits=bits, a_bits=bits))
    assert (q.w_bits, q.a_bits) == (bits, bits)


@pytest.mark.parametrize('a_bits', [None, 32])
def test_float_activations(a_bits):
    assert QuantConfig(dict(a_bits=a_bits)).a_bits is None


# ---------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('overrides,match', [
    ([dict(pattern='a', w_bits=1)], 'quant_cfg.overrides[0].w_bits=1'),
    ([dict(pattern='a', a_bits=9)], 'quant_cfg.overrides[0].a_bits=9'),
    ([dict(pattern='a', w_bits='8')], "quant_cfg.overrides[0].w_bits='8'"),
    ([dict(pattern='a', bits=8)], "quant_cfg.overrides[0] has unknown key(s) ['bits']"),
    ([dict(w_bits=8)], 'quant_cfg.overrides[0] must be a dict with a "pattern" key'),
    (['backbone.*'], 'quant_cfg.overrides[0]'),
    ([dict(pattern='a', w_bits=8), dict(pattern='b', a_bits=3, wbits=2)],
     'quant_cfg.overrides[1] has unknown key(s)'),
])
def test_bad_overrides_raise_naming_the_entry(overrides, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        QuantConfig(dict(overrides=overrides))


def test_overrides_accept_float_activation_bits():
    q = QuantConfig(dict(overrides=[dict(pattern='a', a_bits=32), dict(pattern='b', a_bits=None)]))
    assert q.bits_for('a', 'f', 'l') == (4, None)
    assert q.bits_for('b', 'f', 'l') == (4, None)


# ---------------------------------------------------------------------------------------
# per-layer decisions
# ---------------------------------------------------------------------------------------
def test_bits_for_precedence():
    q = QuantConfig(dict(
        w_bits=4, a_bits=4, keep_8bit=['first', 'last', 'head.*'],
        overrides=[dict(pattern='backbone.layer1.*', w_bits=6),
                   dict(pattern='backbone.layer1.0.*', w_bits=2, a_bits=3),
                   dict(pattern='head.fc', a_bits=5)]))
    first, last = 'backbone.conv1', 'head.fc'
    assert q.bits_for('backbone.layer2.0.conv1', first, last) == (4, 4)
    assert q.bits_for(first, first, last) == (8, 8)
    assert q.bits_for('head.other', first, last) == (8, 8)  # keep_8bit by pattern
    # overrides apply after keep_8bit; missing keys keep the earlier decision
    assert q.bits_for('head.fc', first, last) == (8, 5)
    assert q.bits_for('backbone.layer1.1.conv1', first, last) == (6, 4)
    # a later matching override wins over an earlier one
    assert q.bits_for('backbone.layer1.0.conv1', first, last) == (2, 3)
    q2 = QuantConfig(dict(overrides=[dict(pattern='backbone.layer1.0.*', w_bits=2),
                                     dict(pattern='backbone.layer1.*', w_bits=6)]))
    assert q2.bits_for('backbone.layer1.0.conv1', first, last) == (6, 4)
    # "first"/"last" are keywords, not patterns
    q3 = QuantConfig(dict(keep_8bit=['first']))
    assert q3.bits_for(last, first, last) == (4, 4)
    assert q3.bits_for('first', first, last) == (4, 4)
    # an override can lower a kept-8-bit layer
    q4 = QuantConfig(dict(overrides=[dict(pattern='backbone.conv1', w_bits=3)]))
    assert q4.bits_for(first, first, last) == (3, 8)


def test_bits_for_reference_convention():
    """The reference code's placement: first layer's weights and output at 8 bits (the image
    float), the last layer's weights at 8 bits and its input at a_bits."""
    first, after, last = 'backbone.conv1', 'backbone.layer1.0.conv1', 'head.fc'
    q = QuantConfig(dict(w_bits=2, a_bits=2, convention='reference'))
    assert q.bits_for(first, first, last, after) == (8, None)
    assert q.bits_for(after, first, last, after) == (2, 8)
    assert q.bits_for(last, first, last, after) == (8, 2)
    assert q.bits_for('backbone.layer2.0.conv1', first, last, after) == (2, 2)
    ours = QuantConfig(dict(w_bits=2, a_bits=2))
    assert ours['convention'] == 'mmbrecq'
    assert [ours.bits_for(n, first, last, after) for n in (first, after, last)] == [(8, 8), (2, 2), (8, 8)]
    # without 'first' in keep_8bit nothing of the stem is kept, in either convention
    q2 = QuantConfig(dict(w_bits=2, a_bits=2, convention='reference', keep_8bit=['last']))
    assert q2.bits_for(first, first, last, after) == (2, 2)
    assert q2.bits_for(after, first, last, after) == (2, 2)
    # overrides still come last
    q3 = QuantConfig(dict(w_bits=2, a_bits=2, convention='reference', overrides=[dict(pattern=last, a_bits=8)]))
    assert q3.bits_for(last, first, last, after) == (8, 8)
    with pytest.raises(ValueError, match='quant_cfg.convention'):
        QuantConfig(dict(convention='paper'))


def test_is_skipped_uses_fnmatch_patterns():
    q = QuantConfig(dict(skip=['backbone.layer4.*', 'head.fc']))
    assert q.is_skipped('backbone.layer4.0.conv1') and q.is_skipped('head.fc')
    assert not q.is_skipped('backbone.layer3.0.conv1') and not q.is_skipped('head.fc2')


def test_quant_config_instance_is_accepted_by_quantize_model():
    model = quantize_model(_small_model(), QuantConfig(_cfg(w_bits=2, keep_8bit=[])))
    assert model[3].weight_quantizer.bits == 2


# ---------------------------------------------------------------------------------------
# patterns that match nothing (typos) are errors at quantize_model time
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('kwargs,match', [
    (dict(skip=['3', 'backbone.*']), "quant_cfg.skip: pattern 'backbone.*'"),
    (dict(keep_8bit=['first', 'nope']), "quant_cfg.keep_8bit: pattern 'nope'"),
    (dict(overrides=[dict(pattern='7', w_bits=8), dict(pattern='head.fc', w_bits=8)]),
     "quant_cfg.overrides[1].pattern: pattern 'head.fc'"),
])
def test_patterns_matching_no_layer_raise(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        quantize_model(_small_model(), _cfg(**kwargs))


def test_patterns_matching_layers_are_accepted():
    model = quantize_model(_small_model(), _cfg(skip=['3'], keep_8bit=['first', '7'],
                                                overrides=[dict(pattern='[07]', w_bits=6)]))
    assert type(model[3]) is nn.Conv2d
    assert model[0].weight_quantizer.bits == 6 and model[7].weight_quantizer.bits == 6


def test_skip_everything_raises():
    with pytest.raises(ValueError, match='quant_cfg.skip'):
        quantize_model(_small_model(), _cfg(skip=['*']))


def test_model_without_quantizable_layers_raises():
    with pytest.raises(ValueError, match='no Conv2d/Linear'):
        quantize_model(nn.Sequential(nn.ReLU()), _cfg())


# ---------------------------------------------------------------------------------------
# block rules and quantizer types
# ---------------------------------------------------------------------------------------
def test_unknown_block_rule_raises():
    with pytest.raises(ValueError, match=r"quant_cfg.block_rules\[1\]='NoSuchRule' is not a registered block rule"):
        quantize_model(_small_model(), _cfg(block_rules=['MMPretrainBasicBlockRule', 'NoSuchRule']))


def test_known_block_rules_accepted():
    model = quantize_model(_small_model(), _cfg(block_rules=['MMPretrainBasicBlockRule']))
    assert isinstance(model[0], QuantLayerMixin)
    model = quantize_model(_small_model(), _cfg(block_rules=[]))
    assert isinstance(model[7], QuantLayerMixin)


@pytest.mark.parametrize('key', ['weight_quantizer', 'act_quantizer'])
def test_unknown_quantizer_type_raises_naming_the_key(key):
    with pytest.raises(ValueError, match=re.escape(f"quant_cfg.{key}.type='NoSuchQuantizer'")):
        quantize_model(_small_model(), _cfg(**{key: dict(type='NoSuchQuantizer')}))


@pytest.mark.parametrize('key', ['weight_quantizer', 'act_quantizer'])
@pytest.mark.parametrize('value', [dict(init='lp'), 'LSQQuantizer', None])
def test_quantizer_without_type_raises_naming_the_key(key, value):
    with pytest.raises(ValueError, match=re.escape(f'quant_cfg.{key}')):
        QuantConfig({key: value})


def test_quantizer_options_reach_the_quantizers():
    model = quantize_model(_small_model(), dict(
        weight_quantizer=dict(type='UniformQuantizer', init='minmax', symmetric=True),
        act_quantizer=dict(type='LSQQuantizer', init='minmax', grad_scale=False), keep_8bit=[]))
    wq = model[3].weight_quantizer
    assert type(wq).__name__ == 'UniformQuantizer' and wq.symmetric and wq.init == 'minmax'
    assert wq.num_channels == 4 and wq.initialized
    aq = model[3].input_quantizer
    assert type(aq).__name__ == 'LSQQuantizer' and not aq.use_grad_scale and aq.bits == 4


# ---------------------------------------------------------------------------------------
# float activations
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('a_bits', [None, 32])
def test_float_activations_build_no_activation_quantizer(a_bits):
    model = quantize_model(_small_model(), _cfg(a_bits=a_bits, keep_8bit=[]))
    layers = [m for m in model.modules() if isinstance(m, QuantLayerMixin)]
    assert len(layers) == 3
    assert all(m.input_quantizer is None for m in layers)
    assert quantizers_of(model, 'act') == []
    assert len(quantizers_of(model, 'weight')) == 3
    model(torch.randn(2, 3, 8, 8))  # no calibration needed


def test_float_activations_override_per_layer():
    model = quantize_model(_small_model(), _cfg(keep_8bit=[], overrides=[dict(pattern='3', a_bits=32)]))
    assert model[3].input_quantizer is None
    assert model[0].input_quantizer.bits == 4 and model[7].input_quantizer.bits == 4


@pytest.mark.parametrize('a_bits', [None, 32])
def test_float_activations_with_default_keep_8bit(a_bits):
    model = quantize_model(_small_model(), _cfg(a_bits=a_bits))
    assert model[0].weight_quantizer.bits == 8 and model[7].weight_quantizer.bits == 8
    assert quantizers_of(model, 'act') == []


def test_mixed_precision_section_is_validated():
    """Accepted when valid; a bad section is an error naming the key (details in
    test_mixed_precision_config.py)."""
    QuantConfig(dict(mixed_precision=dict(type='GeneticSearcher', budget=dict(size_mb=1))))
    with pytest.raises(ValueError, match='quant_cfg.mixed_precision.budget'):
        QuantConfig(dict(mixed_precision=dict(type='GeneticSearcher', budget=dict(size_mb=1, bops=2))))

"""Registries of mmbrecq, children of mmengine's roots.

Being children means ``type='mmbrecq.X'`` works from any OpenMMLab config and that
mmengine's builders (``Runner``, loops, hooks, datasets, metrics) find our classes
through their usual scopes. The quantization-specific registries (quantizers,
reconstructors, block rules, searchers, task losses, cost models) have no mmengine
counterpart: they are roots in the ``mmbrecq`` scope (mmengine allows one child per scope
under a parent, which ``MODELS`` already is).
"""
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, locations=['mmbrecq'])
LOOPS = Registry('loop', parent=MMENGINE_LOOPS, locations=['mmbrecq.engine'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, locations=['mmbrecq.engine'])
DATASETS = Registry('dataset', parent=MMENGINE_DATASETS, locations=['mmbrecq.datasets'])
TRANSFORMS = Registry('transform', parent=MMENGINE_TRANSFORMS, locations=['mmbrecq.datasets'])
METRICS = Registry('metric', parent=MMENGINE_METRICS, locations=['mmbrecq.evaluation'])

#: uniform / AdaRound / LSQ quantizers, built from ``quant_cfg`` by type
QUANTIZERS = Registry('quantizer', scope='mmbrecq', locations=['mmbrecq.quantizers'])
#: float block class -> reconstruction-unit rule
BLOCK_RULES = Registry('block rule', scope='mmbrecq', locations=['mmbrecq.blocks'])
#: block / layer reconstructors (``quant_cfg.recon.type``)
RECONSTRUCTORS = Registry('reconstructor', scope='mmbrecq', locations=['mmbrecq.reconstruction'])
#: per-task losses whose gradient gives the Fisher weights (classification, detection)
TASK_LOSSES = Registry('task loss', scope='mmbrecq', locations=['mmbrecq.reconstruction'])
#: mixed-precision searchers (``quant_cfg.mixed_precision.type``)
SEARCHERS = Registry('searcher', scope='mmbrecq', locations=['mmbrecq.mixed_precision'])
#: mixed-precision cost models (size, BOPs, latency)
COST_MODELS = Registry('cost model', scope='mmbrecq', locations=['mmbrecq.mixed_precision'])


def build_from(registry, cfg, **default_args):
    """Build ``cfg`` from one of our own registries, whatever the default scope is.

    Inside a runner the default scope is the model's (``mmpretrain``, ``mmdet``), which
    our scope-``mmbrecq`` roots do not know; looking the class up directly avoids
    mmengine's scope-switching fallback (and its warning) without changing behaviour.
    """
    args = dict(cfg)
    name = args.pop('type')
    cls = registry.get(name) if isinstance(name, str) else name
    if cls is None:
        raise KeyError(f'{name!r} is not registered in the {registry.name} registry; '
                       f'registered: {sorted(registry.module_dict)}')
    return cls(**default_args, **args)

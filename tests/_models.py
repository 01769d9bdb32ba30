"""Models and inputs shared by the tests (no download: configs come from the installed wheels)."""
import torch
from mmengine.hub import get_config
from torch.nn.modules.batchnorm import _BatchNorm


def images(n, seed, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def build_classifier(cfg_name='resnet/resnet18_8xb32_in1k.py', seed=0):
    """mmpretrain classifier from the installed config with random BN statistics and affine
    parameters (so BN folding is not trivial), in eval mode."""
    from mmpretrain.registry import MODELS
    torch.manual_seed(seed)
    model = MODELS.build(get_config(f'mmpretrain::{cfg_name}').model)
    return randomize_bn(model, seed + 100).eval()


@torch.no_grad()
def randomize_bn(model, seed):
    """Random BN statistics and affine parameters: folded biases are then not all zero (with
    BN at its defaults, conv outputs land exactly on rounding ties of the next grid)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


#: min-max ranges: the Lp search (the default) is too slow for unit tests on 2 CPU cores
FAST_QCFG = dict(w_bits=4, a_bits=4, weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
                 act_quantizer=dict(type='LSQQuantizer', init='minmax'))


def reconstructed_like_resnet18(seed=0, qcfg=FAST_QCFG):
    """A quantized ResNet-18 as reconstruction leaves it: activations calibrated, every other
    layer in hard rounding with (random) learned alpha, the rest in nearest rounding."""
    import mmbrecq
    model = mmbrecq.quantize_model(build_classifier('resnet/resnet18_8xb32_in1k.py', seed), qcfg)
    mmbrecq.calibrate_activations(model, [images(8, seed=7)], lambda m, b: m(b, mode='tensor'))
    return random_hard_rounding(model)


def random_hard_rounding(model, seed=11):
    """Every other quantized layer of ``model`` in hard rounding from a random alpha (as a
    reconstruction leaves it), the rest in nearest rounding; returns ``model``."""
    from mmbrecq.modules import QuantLayerMixin
    g = torch.Generator().manual_seed(seed)
    for layer in [m for m in model.modules() if isinstance(m, QuantLayerMixin)][1::2]:
        q = layer.weight_quantizer
        q.set_rounding('soft', layer.weight)
        with torch.no_grad():
            q.alpha.copy_(torch.randn(layer.weight.shape, generator=g) * 3)
        q.set_rounding('hard')
    return model


def shrink_detector_cfg(model_cfg, width=8):
    """A CPU-sized version of an mmdet detector config: ResNet-18 backbone ``width`` channels
    wide, narrow FPN and heads, few proposals; same code paths as the full model."""
    model_cfg.backbone.update(depth=18, base_channels=width, init_cfg=None)
    model_cfg.neck.update(in_channels=[width * 2**i for i in range(4)], out_channels=2 * width)
    if 'rpn_head' in model_cfg:  # two-stage
        model_cfg.rpn_head.update(in_channels=2 * width, feat_channels=2 * width)
        rcnn = model_cfg.roi_head
        rcnn.bbox_roi_extractor.out_channels = 2 * width
        rcnn.bbox_head.update(in_channels=2 * width, fc_out_channels=4 * width)
        model_cfg.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=50)
        model_cfg.train_cfg.rcnn.sampler.num = 32
        model_cfg.test_cfg.rpn.update(nms_pre=200, max_per_img=50)
        model_cfg.test_cfg.rcnn.score_thr = 0.
    else:
        model_cfg.bbox_head.update(in_channels=2 * width, feat_channels=2 * width, stacked_convs=2)
        model_cfg.test_cfg.score_thr = 0.
    return model_cfg


@torch.no_grad()
def build_detector(name='retinanet', seed=0, width=8):
    """A small random mmdet Faster R-CNN (``'faster_rcnn'``) or RetinaNet (random BN), in eval mode."""
    import mmdet.utils
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope
    mmdet.utils.register_all_modules(init_default_scope=False)
    path = {'faster_rcnn': 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
            'retinanet': 'retinanet/retinanet_r50_fpn_1x_coco.py'}[name]
    cfg = shrink_detector_cfg(get_config(f'mmdet::{path}').model, width)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg)
    return randomize_bn(model, seed + 100).eval()


def detection_batches(model, n_batches=2, batch=2, size=64, seed=0):
    """Preprocessed random-image batches with image metadata (no annotations needed)."""
    from mmdet.structures import DetDataSample
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        imgs = [torch.randint(0, 256, (3, size, size), generator=g).to(torch.uint8) for _ in range(batch)]
        samples = [DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                               scale_factor=(1., 1.))) for _ in range(batch)]
        out.append(model.data_preprocessor(dict(inputs=imgs, data_samples=samples), False))
    return out

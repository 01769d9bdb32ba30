"""What calibration and the Fisher pass need from an mmdet detector, on the stock model.

* **Raw head outputs** (:func:`detection_forward`): the detector's dense outputs before
  any decoding or NMS, each tagged with how its divergence is measured (``'sigmoid'`` /
  ``'softmax'`` class scores, ``'l2'`` box deltas). Single-stage detectors give their
  ``tensor``-mode outputs; two-stage ones give the RPN's objectness and deltas and the
  RoI head's class scores and deltas.
* **Fixed proposals** (:func:`attach_proposals`): a two-stage detector's RoI head runs on
  proposals that depend on the RPN. If the quantized model proposed its own boxes, its
  RoI-head inputs and the float targets would describe different boxes, and their
  number would change from run to run. So every calibration image carries the float
  model's top ``num_proposals`` proposals (padded by repetition when fewer survive NMS),
  and every forward of the calibration set, float or quantized, uses those: the RoI
  head sees ``images x num_proposals`` rows that correspond one to one.
"""
import torch

from mmbrecq.modules import quantizers_of


def is_detector(model) -> bool:
    try:
        from mmdet.models.detectors import BaseDetector
    except ImportError:
        return False
    return isinstance(model, BaseDetector)


def is_two_stage(model) -> bool:
    return is_detector(model) and getattr(model, 'roi_head', None) is not None


def _cls_kind(uses_sigmoid):
    return 'sigmoid' if uses_sigmoid else 'softmax'


def _as_list(t):
    return list(t) if isinstance(t, (list, tuple)) else [t]


def detection_forward(model, batch):
    """``{name: dict(kind=..., values=[tensors])}``: the raw head outputs of a detector.

    Two-stage detectors need ``batch['proposals']`` (see :func:`attach_proposals`).
    """
    inputs, samples = batch['inputs'], batch['data_samples']
    if not is_two_stage(model):
        outs = model(inputs, samples, mode='tensor')
        if not isinstance(outs, (list, tuple)) or not outs:
            raise TypeError(f'{type(model).__name__}: tensor mode returned {type(outs).__name__}, expected '
                            'a tuple of per-level outputs (class scores first)')
        head = getattr(model, 'bbox_head', None)
        result = {'cls': dict(kind=_cls_kind(getattr(head, 'use_sigmoid_cls', True)), values=_as_list(outs[0]))}
        for i, extra in enumerate(outs[1:]):
            result[f'out{i + 1}'] = dict(kind='l2', values=_as_list(extra))
        return result
    if 'proposals' not in batch:
        raise KeyError(f'{type(model).__name__} is a two-stage detector: its calibration batches need fixed '
                       'proposals (mmbrecq.engine.detection.attach_proposals)')
    x = model.extract_feat(inputs)
    result = {}
    if getattr(model, 'with_rpn', False):
        rpn_cls, rpn_reg = model.rpn_head(x)[:2]
        result['rpn_cls'] = dict(kind=_cls_kind(getattr(model.rpn_head, 'use_sigmoid_cls', True)),
                                 values=_as_list(rpn_cls))
        result['rpn_reg'] = dict(kind='l2', values=_as_list(rpn_reg))
    roi_outs = model.roi_head.forward(x, batch['proposals'], samples)
    loss_cls = getattr(getattr(model.roi_head, 'bbox_head', None), 'loss_cls', None)
    result['roi_cls'] = dict(kind=_cls_kind(getattr(loss_cls, 'use_sigmoid', False)), values=[roi_outs[0]])
    for i, extra in enumerate(roi_outs[1:]):
        result[f'roi_out{i + 1}'] = dict(kind='l2', values=[extra])
    return result


def _fixed_count(result, num, sample):
    """``num`` boxes: the best ``num`` proposals, repeated cyclically if fewer survived NMS."""
    from mmengine.structures import InstanceData
    boxes = result.bboxes
    if len(boxes) == 0:  # nothing proposed: the whole image
        h, w = sample.metainfo['img_shape'][:2]
        boxes = boxes.new_tensor([[0., 0., float(w), float(h)]])
    reps = -(-num // len(boxes))
    fixed = InstanceData()
    fixed.bboxes = boxes.repeat(reps, 1)[:num].detach().clone()
    return fixed


@torch.no_grad()
def attach_proposals(model, batches, num_proposals):
    """Store the float model's ``num_proposals`` best RPN proposals per image in each batch.

    Quantization is switched off for the duration (the proposals are the float model's
    even when called on a swapped model) and restored afterwards.
    """
    if not getattr(model, 'with_rpn', False):
        for batch in batches:  # proposals come with the data (mmdet's pre-computed proposals)
            batch['proposals'] = [_fixed_count(s.proposals, num_proposals, s) for s in batch['data_samples']]
        return batches
    states = [(q, q.enabled) for q in quantizers_of(model)]
    for q, _ in states:
        q.enabled = False
    try:
        for batch in batches:
            x = model.extract_feat(batch['inputs'])
            results = model.rpn_head.predict(x, batch['data_samples'], rescale=False)
            batch['proposals'] = [_fixed_count(r, num_proposals, s)
                                  for r, s in zip(results, batch['data_samples'])]
    finally:
        for q, enabled in states:
            q.enabled = enabled
    return batches

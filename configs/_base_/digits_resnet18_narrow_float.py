# The demo's harder classifier: the slim ResNet-18 of digits_resnet_float.py at half its
# width (stem/base channels 8: 0.18 M parameters). Fewer channels leave less redundancy
# for quantization noise to hide in, so at W2A2 / W3A3 the methods separate where the
# 16-channel model saturates (benchmarks/bench_vs_reference.py, bench_ablations.py).
# Train with `tools/train_digits.py --model resnet18_narrow`, which writes
# checkpoints/digits_resnet18_narrow_float.pth.
_base_ = ['./digits_resnet_float.py']

model = dict(
    backbone=dict(stem_channels=8, base_channels=8),
    head=dict(in_channels=64))  # base_channels * 8

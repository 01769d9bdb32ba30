# The CPU-sized BRECQ recipe of the digits demos (ResNet-18, ViT): 512 calibration images
# from the training set, batches of 64, 1000 iterations per unit; every other value is
# quant_cfg's default (mmbrecq/config/quant_cfg.py: the paper's recipe).
quant_cfg = dict(
    w_bits=4,
    a_bits=4,
    calib=dict(num_samples=512, batch_size=64),
    recon=dict(iters=1000),
)

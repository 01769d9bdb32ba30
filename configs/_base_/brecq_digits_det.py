# BRECQ on the detection demo (mmbrecq.DigitsCocoDataset, 128x128 canvases): the COCO recipe
# (configs/_base_/brecq_coco.py) scaled to a CPU demo: 128 calibration canvases through the
# detector's train pipeline, 500 iterations per unit, batch 16 canvases; two-stage models
# calibrate their RoI head on the float model's 100 best proposals per canvas.
# (custom_imports is set by each config: the float config's would clash with one here)
quant_cfg = dict(
    w_bits=4,
    a_bits=8,
    calib=dict(num_samples=128, batch_size=16, split='train', num_proposals=100),
    recon=dict(type='BlockReconstructor', iters=500, batch_size=16, lam=0.01, b_range=(20, 2),
               warmup=0.2, loss='fisher_diag', act_lr=4e-5, input_mix='quant'),
)

"""What a PTQ or evaluation run changes in the model's mmengine config before building its Runner."""


def without_training(cfg):
    """``cfg`` for a runner that never trains or validates (PTQ, evaluation of a quantized model).

    mmengine's Runner wants train dataloader, train loop and optimiser all set or all unset;
    PTQ reads its calibration loader from ``quant_cfg.calib`` instead.
    """
    for key in ('train_cfg', 'optim_wrapper', 'param_scheduler', 'val_cfg'):
        cfg.pop(key, None)
    cfg.train_dataloader, cfg.val_dataloader, cfg.val_evaluator = None, None, None
    return cfg

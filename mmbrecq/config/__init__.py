"""``quant_cfg``: its schema (every key, default and check) and validation, in one place."""
from .quant_cfg import (
                        DEFAULT_CALIB,
                        DEFAULT_RECON,
                        DEFAULT_SENSITIVITY,
                        DEFAULTS,
                        FISHER_WEIGHTS,
                        FLOAT_ACT_BITS,
                        QUANT_CFG,
                        TENSOR_KINDS,
                        act_bits,
                        calib_config,
                        mp_config,
                        recon_config,
                        searcher_args,
                        validate_quant_cfg,
)
from .schema import ConfigError, Key, Section

__all__ = [
    'QUANT_CFG', 'TENSOR_KINDS', 'DEFAULTS', 'DEFAULT_RECON', 'DEFAULT_CALIB', 'DEFAULT_SENSITIVITY', 'FISHER_WEIGHTS',
    'FLOAT_ACT_BITS', 'validate_quant_cfg', 'recon_config', 'calib_config', 'mp_config', 'act_bits',
    'searcher_args', 'ConfigError', 'Key', 'Section'
]

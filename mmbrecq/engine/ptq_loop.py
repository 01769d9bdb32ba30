"""The PTQ loop: mmengine's test loop turned into calibrate → reconstruct → evaluate.

Registered in LOOPS and run by ``runner.test()`` (``test_cfg=dict(type='mmbrecq.PTQLoop')``),
so mmengine builds the test dataloader and evaluator from the config and drives the
hooks; the loop loads the float checkpoint itself, strictly (``checkpoint``: every key
matched, every value finite), before any work. Stages announce themselves through
``runner.call_hook`` so that ``custom_hooks`` can observe or extend a run:

``before_calibration`` / ``after_calibration(calib)`` (the calibration set is drawn before
the float evaluation, so that a bad ``calib`` setting stops the run first) →
``before_quant_eval(stage)`` / ``after_quant_eval(stage, metrics)`` for ``fp``, ``nearest``, ``brecq`` →
``before_recon_unit(index, unit)`` / ``after_recon_unit(index, unit, record, records)`` →
``after_ptq(model, results)``.
"""
import os.path as osp
import time

import torch
from mmengine.model import is_model_wrapper
from mmengine.runner import TestLoop

from mmbrecq.mixed_precision.pipeline import search_mixed_precision
from mmbrecq.modules import QuantConfig, quantizable_layers, quantize_model, set_quant_state
from mmbrecq.reconstruction import calibrate_activations, reconstruct
from mmbrecq.reconstruction.reconstructor import STATE_FILE
from mmbrecq.registry import LOOPS
from mmbrecq.utils import atomic_json_dump, load_checkpoint_file

from .calibration import build_calibration_set
from .preflight import check_resume, load_float_checkpoint, plain_quant_cfg, read_progress

PROGRESS_FILE = 'ptq_progress.json'


@LOOPS.register_module()
class PTQLoop(TestLoop):
    """Post-training quantization of the runner's model with BRECQ.

    Args:
        eval_fp: evaluate the float model first.
        eval_nearest: evaluate the quantized model with nearest rounding (no reconstruction).
        resume: continue an interrupted run from the work dir (finished units and
            evaluations are not redone).
        checkpoint: the float checkpoint, loaded strictly (every key matched, every value
            finite) before any work; ``None``: the model as the runner loaded it (``load_from``).
    """

    def __init__(self, runner, dataloader, evaluator, eval_fp=True, eval_nearest=True, resume=False,
                 fp16=False, checkpoint=None):
        super().__init__(runner, dataloader, evaluator, fp16)
        self.quant_cfg = QuantConfig(runner.cfg.get('quant_cfg'))
        # name patterns need the model's layer names: checked as soon as the model exists
        self.quant_cfg.check_patterns(quantizable_layers(self.model))
        self.eval_fp, self.eval_nearest, self.resume = eval_fp, eval_nearest, resume
        self.checkpoint = checkpoint
        self.results = dict(metrics={}, seconds={})

    @property
    def model(self):
        m = self.runner.model
        return m.module if is_model_wrapper(m) else m

    # -- bookkeeping so that a resumed run skips finished evaluations --------------------------
    def _progress_path(self):
        return osp.join(self.runner.work_dir, PROGRESS_FILE)

    def _save_progress(self):
        if self.runner.rank == 0:  # the quant_cfg too: a resume with another one is refused
            atomic_json_dump(dict(self.results, quant_cfg=plain_quant_cfg(self.runner.cfg.quant_cfg)),
                             self._progress_path(), indent=2, default=str)

    def _load_progress(self):
        if not self.resume:
            return
        progress = read_progress(self._progress_path(), self.runner.logger)
        check_resume(progress, self._progress_path(), self.runner.cfg.quant_cfg)
        if progress is not None:
            progress.pop('quant_cfg', None)
            self.results = dict(dict(metrics={}, seconds={}), **progress)
        state = osp.join(self.runner.work_dir, STATE_FILE)
        if osp.isfile(state):  # unreadable: stop now, not after calibration
            load_checkpoint_file(state, what='resume state')

    def evaluate(self, stage):
        """One pass over the test set with the config's evaluator; metrics under ``stage``."""
        if stage in self.results['metrics']:
            self.runner.logger.info(f'{stage} evaluation already done (resume): {self.results["metrics"][stage]}')
            return self.results['metrics'][stage]
        self.runner.call_hook('before_quant_eval', stage=stage)
        t0 = time.perf_counter()
        self.runner.call_hook('before_test_epoch')
        self.runner.model.eval()
        self.test_loss.clear()
        for idx, data_batch in enumerate(self.dataloader):
            self.run_iter(idx, data_batch)
        metrics = self.evaluator.evaluate(len(self.dataloader.dataset))
        self.runner.call_hook('after_test_epoch', metrics=metrics)
        self.results['metrics'][stage] = {k: float(v) if isinstance(v, (int, float)) else v
                                          for k, v in metrics.items()}
        self.results['seconds'][f'eval_{stage}'] = time.perf_counter() - t0
        self.runner.logger.info(f'[{stage}] ' + ', '.join(f'{k}: {v}' for k, v in metrics.items()))
        self.runner.call_hook('after_quant_eval', stage=stage, metrics=metrics)
        self._save_progress()
        return metrics

    def run(self) -> dict:
        runner, model, qcfg = self.runner, self.model, self.quant_cfg
        self._load_progress()
        if self.checkpoint is not None:
            self.results['loaded'] = load_float_checkpoint(model, self.checkpoint)
            runner.logger.info(f'float checkpoint {self.checkpoint}: all {self.results["loaded"]["keys"]} keys '
                               'loaded')
        runner.call_hook('before_test')
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        # the calibration set first: a bad calib setting (more samples than the set has) stops the run
        # before the float evaluation's pass over the test set
        runner.call_hook('before_calibration')
        t0 = time.perf_counter()
        calib = build_calibration_set(runner, model, qcfg['calib'])
        t_calib = time.perf_counter() - t0
        self._save_progress()  # from now on the work dir records its quant_cfg
        if self.eval_fp:
            self.evaluate('fp')

        t0 = time.perf_counter()
        quantize_model(model, qcfg)
        set_quant_state(model, True, True)
        calibrate_activations(model, calib.batches[:1], calib.forward, stream=qcfg['calib']['act_stream'])
        self.results['seconds']['calibration'] = t_calib + time.perf_counter() - t0
        runner.call_hook('after_calibration', calib=calib)
        if self.eval_nearest:
            self.evaluate('nearest')
        if qcfg['mixed_precision'] is not None:  # bit map searched (or reused on resume), then applied
            t0 = time.perf_counter()
            self.results['mixed_precision'] = search_mixed_precision(
                model, calib, qcfg, work_dir=runner.work_dir, resume=self.resume, logger=runner.logger,
                write=runner.rank == 0)
            self.results['seconds']['mixed_precision'] = time.perf_counter() - t0

        t0 = time.perf_counter()
        recon_cfg = dict(qcfg['recon'])
        records = reconstruct(model, calib, recon_cfg, work_dir=runner.work_dir, resume=self.resume,
                              logger=runner.logger, runner=runner)
        self.results['seconds']['reconstruction'] = time.perf_counter() - t0
        self.results['units'] = [{k: v for k, v in r.items() if k != 'history'} for r in records]
        del calib
        metrics = self.evaluate('brecq')
        self.results['peak_memory_mb'] = _peak_memory_mb()
        self._save_progress()
        runner.call_hook('after_ptq', model=model, results=self.results)
        runner.call_hook('after_test')
        return metrics


def _peak_memory_mb():
    import resource
    peak = dict(host=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if torch.cuda.is_available():
        peak['cuda'] = torch.cuda.max_memory_allocated() / 2**20
    return peak

"""Loss curves of a reconstruction run (one line per unit), as a PNG, redrawn by a hook."""
import os.path as osp

from mmengine.dist import master_only
from mmengine.hooks import Hook

from mmbrecq.registry import HOOKS
from mmbrecq.utils.io import atomic_path


def plot_losses(records, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in records:
        hist = r.get('history') or []
        if not hist:
            continue
        xs = [i / max(1, len(hist) - 1) for i in range(len(hist))]
        axes[0].plot(xs, [h[0] for h in hist], label=r['name'], lw=0.8)
        axes[1].plot(xs, [h[1] for h in hist], lw=0.8)
    axes[0].set(title='reconstruction loss', xlabel='fraction of iterations', yscale='log')
    axes[1].set(title='rounding regulariser', xlabel='fraction of iterations')
    if records:
        axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, dpi=100, format='png')
    plt.close(fig)
    return path


@HOOKS.register_module()
class ReconLossPlotHook(Hook):
    """Redraws ``recon_losses.png`` (reconstruction and rounding loss per unit) after each unit.

    Args:
        filename: the PNG's name.
        out_dir: its folder (default: the runner's work dir).
    """

    priority = 'VERY_LOW'

    def __init__(self, filename='recon_losses.png', out_dir=None):
        self.filename, self.out_dir = filename, out_dir

    @master_only
    def after_recon_unit(self, runner, index, unit, record, records):
        plot_losses(records, osp.join(self.out_dir or runner.work_dir, self.filename))

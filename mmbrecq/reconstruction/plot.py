"""Loss curves of a reconstruction run (one line per unit), as a PNG."""


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

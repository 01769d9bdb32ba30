"""PNG plots of the mixed-precision search: sensitivities, chosen bits, accuracy/size trade-off."""
from mmbrecq.utils.io import atomic_path


def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_sensitivity(report, path):
    """Left: each unit's sensitivity with all its searched layers at one candidate width
    (log scale); right: the weight bits the search gave every layer."""
    plt = _plt()
    cands = list(report['config']['candidates'])
    units = [u for u in report['units'] if u['searched']]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw=dict(width_ratios=[3, 2]))
    width = 0.8 / max(1, len(cands))
    for k, b in enumerate(cands):
        ys = [report['sensitivity'][u['name']].get(u['diagonal'].get(str(b)), float('nan')) for u in units]
        axes[0].bar([i + (k - (len(cands) - 1) / 2) * width for i in range(len(units))], ys, width,
                    label=f'W{b}')
    axes[0].set_xticks(range(len(units)))
    axes[0].set_xticklabels([u['name'] for u in units], rotation=60, ha='right', fontsize=7)
    axes[0].set(yscale='log', ylabel='Fisher-weighted output error',
                title='sensitivity per unit (all searched layers at one width)')
    axes[0].legend(fontsize=8)
    names = list(report['bit_map'])
    axes[1].bar(range(len(names)), [report['bit_map'][n] for n in names], color='tab:gray')
    axes[1].set_xticks(range(len(names)))
    axes[1].set_xticklabels(names, rotation=90, fontsize=6)
    b = report['budget']
    axes[1].set(ylabel='weight bits', title=f'searched bits ({b["key"]} {report["cost"][b["key"]]:.4g} '
                                              f'<= {b["value"]:.4g})')
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, dpi=100, format='png')
    plt.close(fig)
    return path


def plot_tradeoff(rows, path, x='size_mb', y='top1', title='accuracy / size trade-off'):
    """``rows``: dicts with ``label``, ``kind`` ('uniform' / 'mixed'), ``x`` and ``y`` keys."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for kind, marker in (('uniform', 's'), ('mixed', 'o')):
        pts = sorted((r[x], r[y], r['label']) for r in rows if r['kind'] == kind)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=kind)
        for px, py, label in pts:
            ax.annotate(label, (px, py), textcoords='offset points', xytext=(4, -10), fontsize=7)
    ax.set(xlabel=x, ylabel=y, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, dpi=100, format='png')
    plt.close(fig)
    return path

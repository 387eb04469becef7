"""
The paper's Table 1, Figure 3 and Figure 4 in miniature, on a laptop CPU: deep, narrow Llamas (12 and 24 blocks of
width 64) trained on tiny Shakespeare characters with every norm_scheme, at equal tokens, over several seeds;
then eval_layers on the Pre-LN and LNS models.

    python data/shakespeare_char/prepare.py
    python experiments/cpu_sweep.py                # about an hour on 2 cores; finished runs are skipped on rerun

Prints the table and the numbers experiments/README.md quotes. Writes experiments/results/cpu_sweep.json (every run's
final validation loss and curve, and mean +- std per scheme and depth), experiments/results/layers_<depth>.json
(eval_layers on seed 0, pre against lns) and the figures in experiments/figures/. Training runs go to
experiments/runs/cpu_sweep/; each run's log.jsonl and train.out are committed, so the table can be recomputed from a
clone (--no_train) and a rerun skips them.
"""

import argparse
import json
import os
import statistics
import sys

from training_runs import (HERE, ROOT, analyze_layers, final_val_loss, outcome, pyplot, require_prepared_data,
                           run_all, spread, threads_per_job, train, val_curve, write_json)

SCHEMES = ('pre', 'lns', 'post', 'mix', 'deepnorm', 'peri')


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--depths', type=int, nargs='+', default=[12, 24], choices=[12, 24])
    parser.add_argument('--schemes', nargs='+', default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--steps', type=int, default=500, help='optimizer steps per run (32 x 64 tokens each)')
    parser.add_argument('--jobs', type=int, default=2, help='runs at a time, each with cores/jobs threads')
    parser.add_argument('--no_train', action='store_true', help='only summarize and analyze the finished runs')
    parser.add_argument('--runs', default=os.path.join(HERE, 'runs', 'cpu_sweep'))
    parser.add_argument('--results', default=os.path.join(HERE, 'results'))
    parser.add_argument('--figures', default=os.path.join(HERE, 'figures'))
    parser.add_argument('--data_dir', default=os.path.join(ROOT, 'data', 'shakespeare_char'))
    return parser.parse_args(argv)


def run_dir(args, depth, scheme, seed):
    return os.path.join(args.runs, f'deep{depth}_{scheme}_seed{seed}')


def train_one(args, depth, scheme, seed, threads):
    config = os.path.join(ROOT, 'config', f'shakespeare_char_deep{depth}.py')
    train(run_dir(args, depth, scheme, seed), [
        config, f'--norm_scheme={scheme}', f'--seed={seed}', f'--data_dir={args.data_dir}',
        f'--max_iters={args.steps}', f'--warmup_iters={args.steps // 10}', f'--eval_interval={args.steps // 5}',
        f'--log_interval={args.steps // 10}', '--eval_sequences=640', '--device=cpu'], args.steps, threads)
    print(f"done: depth {depth}, {scheme}, seed {seed}", flush=True)


def summarize(args):
    runs, table = [], {}
    for depth in args.depths:
        for scheme in args.schemes:
            finals = []
            for seed in args.seeds:
                folder = run_dir(args, depth, scheme, seed)
                state = outcome(folder, args.steps)
                if state is None:
                    continue  # with --no_train, runs that have not finished are left out
                final = final_val_loss(folder)
                finals.append(final)
                runs.append({'depth': depth, 'norm_scheme': scheme, 'seed': seed, 'final_val_loss': final,
                             'diverged': state == 'diverged', 'val_curve': val_curve(folder)})
            stats = spread(finals)
            table[f'{depth}/{scheme}'] = {
                'depth': depth, 'norm_scheme': scheme, 'runs': len(finals), 'diverged': stats['diverged'],
                'mean': stats['mean'], 'std': stats['std']}
    return runs, table


def markdown_table(args, table):
    lines = ['| norm_scheme | ' + ' | '.join(f'{d} blocks' for d in args.depths) + ' |',
             '| --- | ' + ' | '.join('---' for _ in args.depths) + ' |']
    for scheme in args.schemes:
        cells = []
        for depth in args.depths:
            row = table[f'{depth}/{scheme}']
            if row['runs'] == 0:
                cell = 'not run'
            elif row['mean'] is None:
                cell = f"diverged ({row['runs']} of {row['runs']})"
            else:
                cell = f"{row['mean']:.4f}" + (f" ± {row['std']:.4f}" if row['std'] is not None else '')
                if row['runs'] != len(args.seeds):
                    cell += f" (n={row['runs']})"
                if row['diverged']:
                    cell += f", {row['diverged']} of {row['runs']} diverged"
            cells.append(cell)
        lines.append(f'| {scheme} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot_curves(args, runs):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(args.depths), figsize=(6 * len(args.depths), 4.5), squeeze=False)
    for ax, depth in zip(axes[0], args.depths):
        for scheme in args.schemes:
            curves = [r['val_curve'] for r in runs if r['depth'] == depth and r['norm_scheme'] == scheme
                      and not r['diverged'] and r['val_curve']]
            if not curves:
                continue
            iters = [i for i, _ in curves[0]]
            values = [[v for _, v in curve] for curve in curves if len(curve) == len(iters)]
            mean = [statistics.mean(column) for column in zip(*values)]
            ax.plot(iters, mean, marker='o', label=f'{scheme} ({len(values)} seeds)')
        ax.set(title=f'{depth} blocks: validation loss (mean over seeds)', xlabel='iteration',
               ylabel='validation loss (nats per character)', ylim=(1.3, 3.0))
        ax.legend()
    fig.tight_layout()
    path = os.path.join(args.figures, 'val_loss_curves.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compact(blocks):
    """[4, 6, 7, 8] -> '4, 6-8'."""
    spans = []
    for block in blocks:
        if spans and block == spans[-1][1] + 1:
            spans[-1][1] = block
        else:
            spans.append([block, block])
    return ', '.join(str(a) if a == b else f'{a}-{b}' for a, b in spans)


def findings(args, table):
    """The sentences experiments/README.md quotes, from the table and the layer analyses of seed 0 (pre against lns)."""
    lines = []
    for depth in args.depths:
        pre, lns = table[f'{depth}/pre'], table[f'{depth}/lns']
        if pre['mean'] is not None and lns['mean'] is not None:
            lines.append(f"{depth} blocks: LNS minus Pre-LN, mean validation loss: "
                         f"{lns['mean'] - pre['mean']:+.4f} nats")
        path = os.path.join(args.results, f'layers_{depth}.json')
        if not os.path.exists(path):
            continue
        with open(path) as f:
            models = json.load(f)['models']
        for model in models:
            layers = model['layers']
            cheap = [layer['block'] for layer in layers if layer['loss_drop'] < 0.002]
            cheapest = min(layers, key=lambda layer: layer['loss_drop'])
            lines.append(f"{depth} blocks, {model['name']}: variance after the last block "
                         f"{layers[-1]['variance']:.2g}; "
                         f"blocks whose removal costs under 0.002 nats: {compact(cheap) or 'none'} of {len(layers)}; "
                         f"the cheapest: block {cheapest['block']}, {cheapest['loss_drop']:.4f} nats")
    return lines


def main(argv):
    args = parse_args(argv)
    require_prepared_data(args.data_dir)
    threads = threads_per_job(args.jobs)
    jobs = [(depth, scheme, seed) for depth in sorted(args.depths, reverse=True) for seed in args.seeds
            for scheme in args.schemes]  # the long runs first, so the pool ends together
    failures = []
    if not args.no_train:
        failures = run_all([lambda job=job: train_one(args, *job, threads) for job in jobs], args.jobs)

    os.makedirs(args.figures, exist_ok=True)
    runs, table = summarize(args)
    if not runs:
        sys.exit(f"error: no finished runs in {args.runs}; nothing written (train first: drop --no_train)")
    settings = {k: v for k, v in vars(args).items() if k not in ('runs', 'results', 'figures', 'data_dir')}
    write_json(os.path.join(args.results, 'cpu_sweep.json'), {'settings': settings, 'summary': table, 'runs': runs})
    print(markdown_table(args, table))
    print(f"wrote {plot_curves(args, runs)}")
    for depth in args.depths:
        folders = [os.path.relpath(run_dir(args, depth, scheme, args.seeds[0])) for scheme in ('pre', 'lns')]
        layers = os.path.join(args.results, f'layers_{depth}.json')
        if all(os.path.exists(os.path.join(folder, 'ckpt.pt')) for folder in folders):
            analyze_layers(folders, args.data_dir, depth, layers, os.path.join(args.figures, f'deep{depth}'),
                           threads)
        else:  # a clone: the checkpoints are not committed, their analyses are
            source = f"those of {os.path.relpath(layers)}" if os.path.exists(layers) else "left out"
            print(f"{depth} blocks: seed {args.seeds[0]}'s checkpoints are not here; the layer findings are {source}")
    for line in findings(args, table):
        print(line)
    if failures:
        sys.exit(f"error: {len(failures)} run(s) failed; the first: {failures[0]}")


if __name__ == '__main__':
    main(sys.argv[1:])

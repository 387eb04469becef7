"""
When does LNS beat Pre-LN at CPU scale? Pre-LN and LNS Llamas on tiny Shakespeare characters (the recipe of
config/shakespeare_char_deep12.py: 32 x 64 tokens per step, Adam without weight decay or clipping, warmup over 10%
of the steps, cosine to a tenth of the peak), compared by final validation loss:
  - against the learning rate (1e-3, 3e-3, 1e-2, 3e-2) at 6, 12, 24 and 48 blocks of width 64;
  - against the width (64, 128, 256; heads of size 16) at 12 blocks and learning rates 1e-3 and 3e-3;
  - under the factors of the authors' public code at 12 blocks, at Pre-LN's best learning rate and at 1e-2: frozen
    norm gains, embedding std 0.632 (the public code's; the authors say their reported runs used 0.02), pure bf16,
    pure bf16 with std 0.632, and four times the steps.

    python data/shakespeare_char/prepare.py
    nohup python experiments/recipe_study.py --jobs 1 --threads 1 > experiments/runs/recipe_study.out 2>&1 &
    python experiments/recipe_study.py --no_train     # results and figures from the runs finished so far

Every cell (a depth, width, learning rate and recipe) is screened with the first seed; the other seeds run where a
conclusion rests on the cell, decided from the screened losses (gap = LNS's loss minus Pre-LN's; a diverged run
counts as worse than any finished one):
  - each scheme's best learning rate at each depth;
  - both cells wherever the gap changes sign between neighbours along the learning rate, the depth or the width;
  - every recipe-factor cell and the cell of our recipe it is compared with.
The work goes in this order: 12 blocks, 6 blocks, width, 24, 48, recipe factors, each screen followed by its extra
seeds, so that the decisions that matter most come first. A run is finished when its log holds the final
validation loss or a divergence; finished runs are skipped, an interrupted one starts again.

Writes experiments/results/recipe_study.json (every run with its validation curve and last logged per-block
variance; per cell each scheme's mean and spread and the gap's; per depth each scheme's best rate and the rates
within 0.02 nats of it), experiments/figures/recipe_*.png, and eval_layers (layer drop, variance per block) on the
first seed of every cell given more seeds (experiments/results/recipe_layers/, experiments/figures/recipe_layers/).
Runs go to experiments/runs/recipe_study/ (each run's log.jsonl and train.out are committed, so the study resumes in
a fresh clone; its checkpoints are not); they are compiled, which on one CPU thread at these sizes beat eager mode.
With --device cuda the runs compute in full float32 (TF32 off) as on a CPU; experiments/recipe_study_gpu.sh runs
several parts of the grid at once on one GPU.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict, namedtuple

from training_runs import (HERE, ROOT, RunFailed, analyze_layers, final_val_loss, outcome, pyplot, read_log,
                           require_prepared_data, run_all, run_device, spread, threads_per_job, train, val_curve,
                           write_json)

SCHEMES = ('pre', 'lns')
BASE_CONFIG = os.path.join(ROOT, 'config', 'shakespeare_char_deep12.py')
HEAD_SIZE = 16  # the base config's width 64 over 4 heads, kept at every width
BASE_DEPTH = 12  # of the width and recipe-factor studies
BASE_WIDTH = 64
WIDTH_LEARNING_RATES = (1e-3, 3e-3)  # the paper's rate and the next above it
FACTOR_FIXED_LEARNING_RATE = 1e-2  # where LNS led Pre-LN in the first probe
TOLERANCE = 0.02  # nats: a scheme's learning-rate range is every rate within this of its best loss
LONGER = 'steps_x4'
# the authors' recipe, one difference at a time, as train.py overrides
FACTORS = {
    LONGER: [],
    'frozen_gains': ['--train_norm_gains=False'],
    'embedding_std_0.632': ['--embedding_init_std=0.632'],
    'pure_bf16': ['--dtype=pure_bfloat16'],
    'pure_bf16_embedding_std_0.632': ['--dtype=pure_bfloat16', '--embedding_init_std=0.632'],
}

Cell = namedtuple('Cell', 'depth width learning_rate factor')


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--depths', type=int, nargs='+', default=[6, 12, 24, 48])
    parser.add_argument('--learning_rates', type=float, nargs='+', default=[1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument('--widths', type=int, nargs='*', default=[64, 128, 256], help='none: no width study')
    parser.add_argument('--factors', nargs='*', default=list(FACTORS), choices=list(FACTORS),
                        help='none: no recipe-factor study')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='the first one screens')
    parser.add_argument('--steps', type=int, default=1500, help='optimizer steps per run (32 x 64 tokens each)')
    parser.add_argument('--compile', type=lambda s: {'true': True, 'false': False}[s.lower()], default=True,
                        help='torch.compile the runs (True: faster on one CPU thread at these sizes)')
    parser.add_argument('--device', default='cpu',
                        help="cpu, or cuda: many small runs at a time on one GPU (in full float32, TF32 off)")
    parser.add_argument('--jobs', type=int, default=1, help='runs at a time')
    parser.add_argument('--threads', type=int, default=None, help='threads per run (default: cores / jobs)')
    parser.add_argument('--no_train', action='store_true', help='only summarize and analyze the finished runs')
    parser.add_argument('--runs', default=os.path.join(HERE, 'runs', 'recipe_study'))
    parser.add_argument('--results', default=os.path.join(HERE, 'results'))
    parser.add_argument('--figures', default=os.path.join(HERE, 'figures'))
    parser.add_argument('--data_dir', default=os.path.join(ROOT, 'data', 'shakespeare_char'))
    args = parser.parse_args(argv)
    problems = [
        (args.steps < 10, f"--steps must be at least 10 (warmup is a tenth of them), not {args.steps}"),
        (min(args.depths) < 1, "every depth in --depths must be at least 1"),
        (min(args.learning_rates) <= 0, "every learning rate must be positive"),
        (any(w < HEAD_SIZE or w % HEAD_SIZE for w in args.widths),
         f"every width must be a multiple of the head size {HEAD_SIZE}, not {args.widths}"),
        (len(set(args.seeds)) != len(args.seeds), f"--seeds must differ from each other, not {args.seeds}"),
        (args.jobs < 1 or (args.threads or 1) < 1, "--jobs and --threads must be at least 1"),
    ]
    for failed, message in problems:
        if failed:
            parser.error(message)
    args.learning_rates = sorted(args.learning_rates)
    return args


# ----------------------------------------------------------------------------- runs

def steps_of(args, factor):
    return 4 * args.steps if factor == LONGER else args.steps


def cell_name(cell):
    return f'd{cell.depth}_w{cell.width}_lr{cell.learning_rate:g}_{cell.factor}'


def run_dir(args, cell, scheme, seed):
    return os.path.join(args.runs, f'{cell_name(cell)}_{scheme}_s{seed}')


def trainer_arguments(args, cell, scheme, seed):
    steps = steps_of(args, cell.factor)
    return [BASE_CONFIG, f'--n_layer={cell.depth}', f'--n_embd={cell.width}', f'--n_head={cell.width // HEAD_SIZE}',
            f'--norm_scheme={scheme}', f'--learning_rate={cell.learning_rate:g}',
            f'--min_lr={cell.learning_rate / 10:g}',
            f'--max_iters={steps}', f'--warmup_iters={steps // 10}', f'--eval_interval={steps // 5}',
            f'--log_interval={steps // 10}', '--eval_sequences=640', f'--seed={seed}', f'--data_dir={args.data_dir}',
            f'--device={args.device}', '--tf32=False', f'--compile={args.compile}', *FACTORS.get(cell.factor, [])]


def train_cell(args, cell, scheme, seed, threads):
    folder, steps = run_dir(args, cell, scheme, seed), steps_of(args, cell.factor)
    if outcome(folder, steps):
        return
    start = time.time()
    state = train(folder, trainer_arguments(args, cell, scheme, seed), steps, threads)
    print(f"{state}: {cell_name(cell)} {scheme} seed {seed} ({time.time() - start:.0f} s)", flush=True)


def final_losses(args, cell, seeds):
    """{scheme: {seed: final validation loss}} of the finished runs of a cell; inf for a diverged run."""
    losses = {}
    for scheme in SCHEMES:
        for seed in seeds:
            folder = run_dir(args, cell, scheme, seed)
            if outcome(folder, steps_of(args, cell.factor)):
                loss = final_val_loss(folder)
                losses.setdefault(scheme, {})[seed] = loss if math.isfinite(loss) else math.inf
    return losses


# ----------------------------------------------------------------------------- what to run

def grid_phases(args):
    """(name, cells) of the learning-rate and width studies in the order they run: the depths up to 12 from 12
    down, the width, then the larger depths."""
    def depth_phase(depth):
        return f'{depth} blocks', [Cell(depth, BASE_WIDTH, lr, 'base') for lr in args.learning_rates]
    phases = [depth_phase(d) for d in sorted((d for d in args.depths if d <= BASE_DEPTH), reverse=True)]
    if args.widths:
        phases.append(('width', [Cell(BASE_DEPTH, width, lr, 'base') for width in sorted(args.widths)
                                 for lr in WIDTH_LEARNING_RATES]))
    phases += [depth_phase(d) for d in sorted(d for d in args.depths if d > BASE_DEPTH)]
    return phases


def best_learning_rate(losses_by_lr):
    """The rate of the lowest loss in {lr: loss}; None when every run diverged."""
    finite = {lr: loss for lr, loss in losses_by_lr.items() if loss is not None and math.isfinite(loss)}
    return min(finite, key=finite.get) if finite else None


def factor_learning_rates(args, screen):
    """Pre-LN's best screened rate at 12 blocks and 1e-2; None until Pre-LN's screen at 12 blocks is complete."""
    screened = {lr: screen.get(Cell(BASE_DEPTH, BASE_WIDTH, lr, 'base'), {}).get('pre') for lr in args.learning_rates}
    if None in screened.values():
        return None
    best = best_learning_rate(screened)
    return sorted({FACTOR_FIXED_LEARNING_RATE} | ({best} if best else set()))


def factor_cells(args, screen):
    rates = factor_learning_rates(args, screen) if args.factors else None
    return [Cell(BASE_DEPTH, BASE_WIDTH, lr, factor) for lr in rates or [] for factor in args.factors]


def planned_cells(args, screen):
    cells = [cell for _, phase in grid_phases(args) for cell in phase]
    cells += [cell for cell in factor_cells(args, screen) if cell not in cells]
    return list(dict.fromkeys(cells))


def gap_sign(losses):
    """+1 when LNS's loss is higher than Pre-LN's (Pre-LN ahead), -1 when lower, 0 when equal or not known."""
    pre, lns = losses.get('pre'), losses.get('lns')
    if pre is None or lns is None or pre == lns:
        return 0
    return 1 if lns > pre else -1


def cells_to_confirm(args, screen):
    """{cell: reasons} of the cells that get every seed, from the screened losses {cell: {scheme: loss}}."""
    reasons = defaultdict(list)
    base = [cell for cell in screen if cell.factor == 'base']
    for depth in args.depths:
        sweep = [Cell(depth, BASE_WIDTH, lr, 'base') for lr in args.learning_rates]
        for scheme in SCHEMES:
            losses = {cell.learning_rate: screen.get(cell, {}).get(scheme) for cell in sweep}
            best = best_learning_rate(losses) if None not in losses.values() else None
            if best is not None:
                reasons[Cell(depth, BASE_WIDTH, best, 'base')].append(f'best learning rate of {scheme}')
    for axis in ('learning_rate', 'depth', 'width'):
        lines = defaultdict(list)
        for cell in base:
            lines[cell._replace(**{axis: None})].append(cell)
        for line in lines.values():
            line.sort(key=lambda cell: getattr(cell, axis))
            for a, b in zip(line, line[1:]):
                if gap_sign(screen[a]) * gap_sign(screen[b]) < 0:
                    for cell in (a, b):
                        reasons[cell].append(f'the gap changes sign between {axis} {getattr(a, axis):g} '
                                             f'and {getattr(b, axis):g}')
    for cell in factor_cells(args, screen):
        if cell not in screen:
            continue  # not screened yet, or train.py rejected its setting: more seeds would fail the same way
        reasons[cell].append('a recipe factor')
        reasons[cell._replace(factor='base')].append('the base of a recipe factor')
    return dict(reasons)


def screened(args, cells):
    """{cell: {scheme: final loss of the screening seed}} for the cells with at least one finished scheme."""
    losses = {cell: {scheme: by_seed[args.seeds[0]] for scheme, by_seed in final_losses(args, cell, args.seeds[:1])
                     .items()} for cell in cells}
    return {cell: value for cell, value in losses.items() if value}


def study_screen(args):
    """The screened losses of every planned cell: the grid's, then those of the recipe factors the grid decides."""
    return screened(args, planned_cells(args, screened(args, planned_cells(args, {}))))


def screen_and_confirm(args, cells, threads):
    """Runs the screening seed of `cells`, then every seed of each cell (of the whole study) that needs them."""
    failures = run_all([lambda c=cell, s=scheme: train_cell(args, c, s, args.seeds[0], threads)
                        for cell in cells for scheme in SCHEMES], args.jobs)
    confirm = cells_to_confirm(args, study_screen(args))
    failures += run_all([lambda c=cell, s=scheme, seed=seed: train_cell(args, c, s, seed, threads)
                         for cell in confirm for seed in args.seeds[1:] for scheme in SCHEMES], args.jobs)
    return failures


def study(args, threads):
    failures = []
    for name, cells in grid_phases(args):
        print(f"== {name}", flush=True)
        failures += screen_and_confirm(args, cells, threads)
        failures += report(args, threads)
    if args.factors:
        cells = factor_cells(args, screened(args, planned_cells(args, {})))
        if not cells:
            print(f"recipe factors skipped: Pre-LN's screen at {BASE_DEPTH} blocks is not complete", flush=True)
        else:
            print("== recipe factors", flush=True)
            failures += screen_and_confirm(args, cells, threads)
            failures += report(args, threads)
    return failures


# ----------------------------------------------------------------------------- results

def describe_cell(args, cell, seeds_by_scheme):
    row = {**cell._asdict(), 'n_head': cell.width // HEAD_SIZE, 'steps': steps_of(args, cell.factor)}
    for scheme in SCHEMES:
        by_seed = seeds_by_scheme.get(scheme, {})
        row[scheme] = {**spread(list(by_seed.values())),
                       'by_seed': {str(seed): finite_or_none(loss) for seed, loss in by_seed.items()}}
    paired = [seeds_by_scheme['lns'][s] - seeds_by_scheme['pre'][s]
              for s in seeds_by_scheme.get('pre', {}) if s in seeds_by_scheme.get('lns', {})]
    row['gap'] = {k: v for k, v in spread(paired).items() if k != 'diverged'}  # LNS minus Pre-LN, seed by seed
    row['gap']['not_comparable'] = len([g for g in paired if not math.isfinite(g)])  # one or both diverged
    return row


def finite_or_none(value):
    return value if value is not None and math.isfinite(value) else None


def learning_rate_summary(rows, depth):
    """Per scheme at one depth: its best mean loss, that rate, and the rates within TOLERANCE of it."""
    sweep = sorted((r for r in rows if r['depth'] == depth and r['width'] == BASE_WIDTH and r['factor'] == 'base'),
                   key=lambda r: r['learning_rate'])
    summary = {}
    for scheme in SCHEMES:
        means = {r['learning_rate']: r[scheme]['mean'] for r in sweep if r[scheme]['n']}
        best = best_learning_rate(means)
        if best is None:
            summary[scheme] = {'best_learning_rate': None}
            continue
        best_row = next(r for r in sweep if r['learning_rate'] == best)
        within = [lr for lr, loss in means.items() if loss <= means[best] + TOLERANCE]
        summary[scheme] = {'best_learning_rate': best, 'best_loss': means[best],
                           'best_loss_std': best_row[scheme]['std'], 'seeds': best_row[scheme]['n'],
                           'learning_rates_within_tolerance': within,
                           'learning_rate_range_within_tolerance': [min(within), max(within)],
                           'diverged_at': [r['learning_rate'] for r in sweep if r[scheme]['diverged']]}
    gaps = [(r['learning_rate'], r['gap']['mean']) for r in sweep if r['gap']['mean'] is not None]
    summary['gap_by_learning_rate'] = dict(gaps)
    summary['gap_changes_sign_between'] = [[a, b] for (a, ga), (b, gb) in zip(gaps, gaps[1:]) if ga * gb < 0]
    return summary


def layer_analyses(args, confirm, threads):
    """eval_layers on the screening seed's pre and lns checkpoints of every confirmed cell whose analysis is
    missing or older than its runs; returns the analyses and the failures."""
    layers, failures = [], []
    for cell in sorted(confirm):
        folders = [run_dir(args, cell, scheme, args.seeds[0]) for scheme in SCHEMES]
        if any(outcome(f, steps_of(args, cell.factor)) != 'finished' for f in folders):
            continue
        path = os.path.join(args.results, 'recipe_layers', f'{cell_name(cell)}.json')
        newest_run = max(os.path.getmtime(os.path.join(f, 'log.jsonl')) for f in folders)
        # a clone holds the runs' logs but not their checkpoints: it keeps the committed analysis
        have_checkpoints = all(os.path.exists(os.path.join(f, 'ckpt.pt')) for f in folders)
        if have_checkpoints and (not os.path.exists(path) or os.path.getmtime(path) < newest_run):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                analyze_layers(folders, args.data_dir, cell.depth, path,
                               os.path.join(args.figures, 'recipe_layers', cell_name(cell)), threads, args.device)
            except RunFailed as error:
                print(f"failed: {error}", flush=True)
                failures.append(str(error))
                continue
        if os.path.exists(path):
            layers.append(read_layer_analysis(args, cell, path, folders))
    return layers, failures


def read_layer_analysis(args, cell, path, folders):
    with open(path) as f:
        models = json.load(f)['models']
    entry = {'cell': cell._asdict(), 'eval_layers': os.path.relpath(path, args.results)}
    for scheme, model, folder in zip(SCHEMES, models, folders):
        entry[scheme] = {key: [layer.get(key) for layer in model['layers']] for key in ('variance', 'loss_drop')}
        entry[scheme]['base_loss'] = model.get('base_loss')
        # per-block diagnostics that train.py logs at its evaluations, when it does
        entry[scheme]['logged'] = [{k: v for k, v in r.items() if k == 'iter' or isinstance(v, list)}
                                   for r in read_log(folder) if 'val_loss' in r and any(isinstance(v, list)
                                                                                        for v in r.values())]
    return entry


def report(args, threads):
    """Rewrites the JSON and the figures from the finished runs; returns the failed layer analyses."""
    screen = study_screen(args)
    cells = planned_cells(args, screen)
    confirm = cells_to_confirm(args, screen)
    runs, rows = [], []
    for cell in cells:
        seeds = args.seeds if cell in confirm else args.seeds[:1]
        losses = final_losses(args, cell, seeds)
        first_of_cell = len(runs)
        for scheme, by_seed in losses.items():
            for seed, loss in by_seed.items():
                folder = run_dir(args, cell, scheme, seed)
                variances = [r['block_variance'] for r in read_log(folder) if 'block_variance' in r]
                runs.append({**cell._asdict(), 'norm_scheme': scheme, 'seed': seed, 'device': run_device(folder),
                             'final_val_loss': finite_or_none(loss), 'diverged': not math.isfinite(loss),
                             'val_curve': val_curve(folder),
                             'final_block_variance': variances[-1] if variances else None})
        if losses:
            devices = sorted({str(run['device']) for run in runs[first_of_cell:]})
            rows.append({**describe_cell(args, cell, losses), 'devices': devices,
                         'more_seeds_because': confirm.get(cell, [])})
    if not runs:
        sys.exit(f"error: no finished runs in {args.runs}; nothing written (train first: drop --no_train)")
    layers, failures = layer_analyses(args, confirm, threads)
    expected = sum(len(SCHEMES) * (len(args.seeds) if cell in confirm else 1) for cell in cells)
    settings = {k: v for k, v in vars(args).items() if k not in ('runs', 'results', 'figures', 'data_dir')}
    write_json(os.path.join(args.results, 'recipe_study.json'), {
        'settings': {**settings, 'base_config': os.path.relpath(BASE_CONFIG, ROOT), 'head_size': HEAD_SIZE,
                     'width_learning_rates': list(WIDTH_LEARNING_RATES), 'tolerance_nats': TOLERANCE},
        'gap': 'final validation loss of lns minus that of pre, paired by seed: positive when Pre-LN is ahead',
        'runs_finished': len(runs), 'runs_planned_so_far': expected,
        'learning_rate': {str(depth): learning_rate_summary(rows, depth) for depth in sorted(args.depths)},
        'findings': findings(args, rows, runs), 'cells': rows, 'layers': layers, 'runs': runs})
    print(markdown_table(rows), flush=True)
    print('\n'.join(['', 'findings (the numbers experiments/README.md quotes):', *findings(args, rows, runs)]),
          flush=True)
    plot_learning_rates(args, rows)
    if args.widths:
        plot_widths(args, rows)
    if args.factors:
        plot_factors(args, rows, control_row(args))
    plot_layers(args, layers)
    return failures


# ----------------------------------------------------------------------------- findings: the numbers quoted

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # Student's t, two-sided 95%, by degrees of freedom


def findings(args, rows, runs):
    """The numbers experiments/README.md quotes about the study, as lines of text, each computed here from the
    finished runs."""
    lines = []
    base = [r for r in rows if r['width'] == BASE_WIDTH and r['factor'] == 'base']
    for depth in sorted({r['depth'] for r in base}):
        summary = learning_rate_summary(rows, depth)
        if any(summary[s]['best_learning_rate'] is None for s in SCHEMES):
            continue
        rates = sorted(r['learning_rate'] for r in base if r['depth'] == depth)
        best = {s: summary[s] for s in SCHEMES}
        text = '; '.join(f"{s} best {best[s]['best_learning_rate']:g} at {best[s]['best_loss']:.4f} "
                         f"({best[s]['seeds']} seed(s)), within {TOLERANCE} nats: "
                         f"{', '.join(f'{lr:g}' for lr in best[s]['learning_rates_within_tolerance'])}"
                         for s in SCHEMES)
        by_seed = [next(r for r in base if r['depth'] == depth and r['learning_rate'] == best[s]['best_learning_rate'])
                   [s]['by_seed'] for s in SCHEMES]
        paired = [by_seed[1][k] - by_seed[0][k] for k in by_seed[0] if k in by_seed[1]
                  and None not in (by_seed[0][k], by_seed[1][k])]
        lines.append(f"{depth} blocks, rates {', '.join(f'{lr:g}' for lr in rates)}: {text}; best against best "
                     f"(lns - pre) {best['lns']['best_loss'] - best['pre']['best_loss']:+.4f}"
                     + (f", by seed {', '.join(f'{g:+.4f}' for g in paired)}" if len(paired) > 1 else '')
                     + f"; the gap changes sign between {summary['gap_changes_sign_between'] or 'no neighbours'}")
    ratios = []
    for r in base:
        last = {run['norm_scheme']: run['final_block_variance'][-1] for run in runs
                if run['final_block_variance'] and run['seed'] == args.seeds[0] and run['factor'] == 'base'
                and (run['depth'], run['width'], run['learning_rate']) == (r['depth'], r['width'], r['learning_rate'])}
        if len(last) == 2:
            ratios.append((last['pre'] / last['lns'], r['depth'], r['learning_rate'], last['pre'], last['lns']))
            lines.append(f"last-block variance, {r['depth']} blocks at {r['learning_rate']:g} (seed "
                         f"{args.seeds[0]}): pre {last['pre']:,.3g}, lns {last['lns']:,.3g}, pre/lns "
                         f"{ratios[-1][0]:,.1f}x")
    if ratios:
        low, high = min(ratios), max(ratios)
        lines.append(f"pre/lns last-block variance ranges from {low[0]:.1f}x ({low[1]} blocks, {low[2]:g}) to "
                     f"{high[0]:,.0f}x ({high[1]} blocks, {high[2]:g})")
        for depth in sorted({depth for _, depth, *_ in ratios}):
            # LNS at its highest rate against Pre-LN at the highest rate where Pre-LN still trains near its best
            window = learning_rate_summary(rows, depth)['pre'].get('learning_rates_within_tolerance') or []
            variance = {(lr, scheme): v for _, d, lr, pre, lns in ratios if d == depth
                        for scheme, v in (('pre', pre), ('lns', lns))}
            top = max(lr for lr, _ in variance)
            if window and (max(window), 'pre') in variance and top > max(window):
                ratio = variance[(top, 'lns')] / variance[(max(window), 'pre')]
                lines.append(f"{depth} blocks: lns at {top:g} ends with {ratio:,.1f}x the last-block variance of pre "
                             f"at {max(window):g}, Pre-LN's highest rate within {TOLERANCE} nats of its best")
    for r in rows:
        if r['factor'] != 'base' and r['gap']['n'] > 1:
            half = T_975[r['gap']['n'] - 1] * r['gap']['std'] / math.sqrt(r['gap']['n'])
            lines.append(f"{r['factor']} ({r['depth']} blocks, {r['learning_rate']:g}): gap {r['gap']['mean']:+.4f}, "
                         f"95% interval +-{half:.3f} ({r['gap']['n']} seeds)")
    base_factor = next((r for r in base if r['depth'] == BASE_DEPTH and r['gap']['n'] > 1
                        and r['learning_rate'] == FACTOR_FIXED_LEARNING_RATE), None)
    if base_factor:
        half = T_975[base_factor['gap']['n'] - 1] * base_factor['gap']['std'] / math.sqrt(base_factor['gap']['n'])
        lines.append(f"our recipe ({BASE_DEPTH} blocks, {FACTOR_FIXED_LEARNING_RATE:g}): gap "
                     f"{base_factor['gap']['mean']:+.4f}, 95% interval +-{half:.3f} ({base_factor['gap']['n']} seeds)")
    lines += longer_run_findings(runs)
    lines += repeat_findings(args)
    return lines


def repeat_findings(args):
    """Same-seed repeats (runs/recipe_study_gpu_repeat/<study folder>__<run>, the H200 repeating finished runs of
    runs/<study folder>/<run>): how far a rerun of the same seed moves the final validation loss."""
    runs = os.path.dirname(args.runs)
    repeats = os.path.join(runs, 'recipe_study_gpu_repeat')
    differences, pairs = [], defaultdict(dict)
    for name in sorted(os.listdir(repeats)) if os.path.isdir(repeats) else []:
        original = os.path.join(runs, *name.split('__', 1))
        if read_log(original) and read_log(os.path.join(repeats, name)):
            again, first = final_val_loss(os.path.join(repeats, name)), final_val_loss(original)
            if math.isfinite(again) and math.isfinite(first):
                differences.append(abs(again - first))
                cell, scheme, seed = name.rsplit('_', 2)
                pairs[(cell, seed)][scheme] = (first, again)
    if not differences:
        return []
    lines = [f"same-seed repeats: {len(differences)} runs, the final validation loss moved by "
             f"{statistics.mean(differences):.4f} on average and {max(differences):.4f} at most"]
    for (cell, seed), by_scheme in sorted(pairs.items()):
        if set(by_scheme) == set(SCHEMES):
            (pre, pre_again), (lns, lns_again) = by_scheme['pre'], by_scheme['lns']
            lines.append(f"repeat of {cell.replace('__', '/')} {seed}: gap {lns - pre:+.4f}, repeated "
                         f"{lns_again - pre_again:+.4f}")
    return lines


def longer_run_findings(runs):
    """The 4x-steps runs: where each one's validation loss was lowest, and the gap there and at the end."""
    longer = [run for run in runs if run['factor'] == LONGER and run['val_curve']]
    if not longer:
        return []
    lines = []
    for run in sorted(longer, key=lambda run: (run['norm_scheme'], run['seed'])):
        lowest_at, lowest = min(run['val_curve'], key=lambda point: point[1])
        lines.append(f"{LONGER} {run['norm_scheme']} seed {run['seed']}: lowest validation loss {lowest:.4f} at "
                     f"iteration {lowest_at}, final {run['val_curve'][-1][1]:.4f}")
    curves = {(run['norm_scheme'], run['seed']): dict(run['val_curve']) for run in longer}
    seeds = sorted({seed for scheme, seed in curves if ('pre', seed) in curves and ('lns', seed) in curves})
    for iteration in sorted(curves[('pre', seeds[0])]) if seeds else []:
        gaps = [curves[('lns', s)][iteration] - curves[('pre', s)][iteration] for s in seeds]
        stats = spread(gaps)
        lines.append(f"{LONGER} gap at iteration {iteration}: {stats['mean']:+.4f}"
                     + (f" +- {stats['std']:.4f}" if stats['std'] is not None else '') + f" ({len(seeds)} seeds)")
    return lines


def control_row(args):
    """Our recipe's cell of the factor study trained on the H200 (runs/recipe_study_gpu/), or None."""
    control = argparse.Namespace(**{**vars(args), 'runs': os.path.join(os.path.dirname(args.runs), 'recipe_study_gpu')})
    cell = Cell(BASE_DEPTH, BASE_WIDTH, FACTOR_FIXED_LEARNING_RATE, 'base')
    losses = final_losses(control, cell, args.seeds)
    if set(losses) != set(SCHEMES):
        return None
    devices = {str(run_device(run_dir(control, cell, scheme, seed))) for scheme in losses for seed in losses[scheme]}
    return {**describe_cell(args, cell, losses), 'devices': sorted(devices)}


def format_loss(stats):
    if stats['n'] == 0:
        return 'diverged' if stats['diverged'] else ''
    text = f"{stats['mean']:.4f}" + (f" ± {stats['std']:.4f}" if stats['std'] is not None else '')
    return text + (f" ({stats['diverged']} diverged)" if stats.get('diverged') else '')


def markdown_table(rows):
    lines = ['| depth | width | lr | factor | pre | lns | gap (lns - pre) | seeds | trained on |', '|' + ' --- |' * 9]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['width']} | {r['learning_rate']:g} | {r['factor']} | "
                     f"{format_loss(r['pre'])} | {format_loss(r['lns'])} | "
                     f"{format_loss({**r['gap'], 'diverged': 0})} | {r['gap']['n']} | {', '.join(r['devices'])} |")
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- figures

def on_gpu(row):
    return any(device != 'cpu' for device in row['devices'])


def point_style(stats, row, color):
    """Filled: the mean of 2-3 seeds (bar: their std); hollow: one seed; a square: trained on the H200."""
    return dict(marker='s' if on_gpu(row) else 'o', markerfacecolor=color if stats['n'] > 1 else 'white',
                color=color, capsize=3, linestyle='none')


def style_legend(ax, plt, extra=()):
    from matplotlib.lines import Line2D
    handles, labels = ax.get_legend_handles_labels()
    keys = [Line2D([], [], marker='o', color='gray', linestyle='none', label='mean ± std of 2-3 seeds'),
            Line2D([], [], marker='o', markerfacecolor='white', color='gray', linestyle='none', label='one seed'),
            Line2D([], [], marker='s', color='gray', linestyle='none', label='trained on the H200')]
    ax.legend(handles=[*handles, *extra, *keys], fontsize=7)


def mark_empty(ax, rows, x_of, grid):
    for x in sorted(set(grid) - {x_of(r) for r in rows}):
        ax.text(x, 0.5, 'not run', transform=ax.get_xaxis_transform(), rotation=90, ha='center', va='center',
                fontsize=8, color='gray')


def plot_scheme_lines(ax, rows, x_of, grid):
    """Mean final loss of pre and lns over the values `grid` of a log-scaled axis, each point styled by its seeds
    and device (point_style); diverged cells as crosses on the top edge, grid values with no run labelled."""
    ax.set(xscale='log', xlim=(min(grid) / 1.5, max(grid) * 1.5), ylabel='final validation loss (nats per character)')
    ax.set_xticks(grid, [f'{x:g}' for x in grid])
    ax.minorticks_off()
    mark_empty(ax, rows, x_of, grid)
    for scheme, color in zip(SCHEMES, ('tab:blue', 'tab:orange')):
        points = sorted(((x_of(r), r[scheme], r) for r in rows if r[scheme]['n']), key=lambda point: point[0])
        ax.plot([x for x, _, _ in points], [s['mean'] for _, s, _ in points], color=color, label=scheme)
        for x, stats, row in points:
            ax.errorbar(x, stats['mean'], yerr=stats['std'] or 0, **point_style(stats, row, color))
        lost = [x_of(r) for r in rows if r[scheme]['diverged'] and not r[scheme]['n']]
        if lost:
            ax.plot(lost, [1] * len(lost), 'x', color=color, markersize=10, transform=ax.get_xaxis_transform(),
                    clip_on=False, label=f'{scheme} diverged')


def plot_gap(ax, rows, x_of, grid):
    """The gap (lns minus pre, paired by seed) with its seed std, over the same axis as plot_scheme_lines."""
    ax.set(xscale='log', xlim=(min(grid) / 1.5, max(grid) * 1.5), ylabel='gap lns - pre (nats; < 0: LNS ahead)')
    ax.set_xticks(grid, [f'{x:g}' for x in grid])
    ax.minorticks_off()
    ax.axhline(0, color='black', linewidth=0.8)
    mark_empty(ax, rows, x_of, grid)
    points = sorted(((x_of(r), r['gap'], r) for r in rows if r['gap']['n']), key=lambda point: point[0])
    ax.plot([x for x, _, _ in points], [g['mean'] for _, g, _ in points], color='tab:green')
    for x, gap, row in points:
        ax.errorbar(x, gap['mean'], yerr=gap['std'] or 0, **point_style(gap, row, 'tab:green'))


def save(fig, args, name):
    fig.tight_layout()
    path = os.path.join(args.figures, name)
    os.makedirs(args.figures, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_learning_rates(args, rows):
    plt = pyplot()
    depths = sorted(args.depths)
    fig, axes = plt.subplots(2, len(depths), figsize=(4.2 * len(depths), 7), squeeze=False, sharey='row',
                             height_ratios=(3, 2))
    for (loss_ax, gap_ax), depth in zip(axes.T, depths):
        cells = [r for r in rows if r['depth'] == depth and r['width'] == BASE_WIDTH and r['factor'] == 'base']
        plot_scheme_lines(loss_ax, cells, lambda r: r['learning_rate'], args.learning_rates)
        plot_gap(gap_ax, cells, lambda r: r['learning_rate'], args.learning_rates)
        loss_ax.set(title=f'{depth} blocks x width {BASE_WIDTH}')
        gap_ax.set(xlabel='peak learning rate')
    style_legend(axes[0][0], plt)
    for ax in axes[:, 1:].flat:
        ax.set_ylabel('')
    print(f"wrote {save(fig, args, 'recipe_learning_rate_by_depth.png')}")
    plt.close(fig)


def plot_widths(args, rows):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(WIDTH_LEARNING_RATES), figsize=(5 * len(WIDTH_LEARNING_RATES), 4), squeeze=False,
                             sharey='row')
    for ax, lr in zip(axes[0], WIDTH_LEARNING_RATES):
        plot_scheme_lines(ax, [r for r in rows if r['depth'] == BASE_DEPTH and r['learning_rate'] == lr
                               and r['factor'] == 'base' and r['width'] in args.widths], lambda r: r['width'],
                          sorted(args.widths))
        ax.set(title=f'{BASE_DEPTH} blocks, learning rate {lr:g}', xlabel=f'width (heads of {HEAD_SIZE})')
    style_legend(axes[0][0], plt)
    print(f"wrote {save(fig, args, 'recipe_width.png')}")
    plt.close(fig)


def plot_factors(args, rows, control=None):
    """The gap per factor with its seed std; `control`, our recipe's cell trained on the H200, goes beside the
    pure-bf16 cells it is the device control of."""
    plt = pyplot()
    factor_rows = [r for r in rows if r['depth'] == BASE_DEPTH and r['width'] == BASE_WIDTH]
    rates = sorted({r['learning_rate'] for r in factor_rows if r['factor'] != 'base'})
    if not rates:
        return
    fig, axes = plt.subplots(1, len(rates), figsize=(9 * len(rates), 4.5), squeeze=False)
    for ax, lr in zip(axes[0], rates):
        by_factor = {r['factor']: r for r in factor_rows if r['learning_rate'] == lr}
        names = [f for f in ['base', *args.factors] if f in by_factor and by_factor[f]['gap']['n']]
        bars = [(f"{'our recipe' if f == 'base' else f}", by_factor[f]) for f in names]
        if control and control['learning_rate'] == lr:
            where = next((i for i, f in enumerate(names) if f.startswith('pure_bf16')), len(names))
            bars.insert(where, ('our recipe, H200 (control)', control))
        gaps = [row['gap'] for _, row in bars]
        ax.barh(range(len(bars)), [g['mean'] for g in gaps], xerr=[g['std'] or 0 for g in gaps], capsize=3,
                color=['tab:gray' if name.startswith('our recipe') else 'tab:green' for name, _ in bars])
        ax.set_yticks(range(len(bars)), [f"{name} (n={row['gap']['n']}{', H200' if on_gpu(row) else ''})"
                                         for name, row in bars])
        ax.axvline(0, color='black', linewidth=0.8)
        ax.invert_yaxis()
        ax.set(title=f'{BASE_DEPTH} blocks, learning rate {lr:g}', xlabel='gap: lns minus pre final validation '
               'loss, mean ± std over seeds\n(> 0: Pre-LN ahead)')
    print(f"wrote {save(fig, args, 'recipe_factors.png')}")
    plt.close(fig)


def plot_layers(args, layers):
    if not layers:
        return
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(len(layers), 2, figsize=(13, 2.8 * len(layers)), squeeze=False)
    for (variance_ax, drop_ax), entry in zip(axes, layers):
        cell = Cell(**entry['cell'])
        for scheme in SCHEMES:
            blocks = range(1, len(entry[scheme]['variance']) + 1)
            variance_ax.plot(blocks, entry[scheme]['variance'], marker='.', label=scheme)
            drop_ax.plot(blocks, entry[scheme]['loss_drop'], marker='.', label=scheme)
        variance_ax.set(yscale='log', ylabel='residual variance',
                        title=f'{cell_name(cell)}, seed {args.seeds[0]}: output variance per block')
        # block 1 costs far more than the rest: a log axis (linear within 1e-3, where a drop may be negative)
        drop_ax.set_yscale('symlog', linthresh=1e-3)
        drop_ax.set(ylabel='loss increase (nats)',
                    title=f'{cell_name(cell)}, seed {args.seeds[0]}: loss without the block')
        for ax in (variance_ax, drop_ax):
            ax.title.set_fontsize(9)
            ax.legend(fontsize=8)
            ax.set_xlabel('block')
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    print(f"wrote {save(fig, args, 'recipe_layers.png')}")
    plt.close(fig)


def main(argv):
    args = parse_args(argv)
    require_prepared_data(args.data_dir)
    threads = threads_per_job(args.jobs, args.threads)
    failures = report(args, threads) if args.no_train else study(args, threads)
    if failures:
        sys.exit(f"error: {len(failures)} run(s) or analyses failed (each printed above as 'failed:'); "
                 f"the first: {failures[0]}")


if __name__ == '__main__':
    main(sys.argv[1:])

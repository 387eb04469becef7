"""
Tuned against tuned, under the paper's Adam: does LNS lower the best loss, or only move where the good learning
rates are? Pre-LN, LNS with the paper's fixed factor, and LNS as learnable gains initialised at 1/sqrt(l)
(lns_mode='gain_init'), on the recipe study's models and data (config/shakespeare_char_deep12.py's recipe, 1,500
steps of 32 x 64 characters, width 64) but with Adam's beta2 at 0.999, over a finer grid of learning rates.

    python data/shakespeare_char/prepare.py
    nohup python experiments/tuned_study.py --jobs 2 > experiments/runs/tuned_study.out 2>&1 &
    python experiments/tuned_study.py --no_train      # the report and figures from the runs finished so far

The rule, depth by depth (12 first, then 6 and 24): every (rate, scheme) cell is screened with seed 0; the grid
grows past an edge where a scheme's best rate sits on it; then 5 seeds at each scheme's best rate and its two
neighbours, and 3 seeds on both sides of every place where an LNS mode's gap to Pre-LN changes sign; then seed 0
at each scheme's best rate is trained again (folder suffix _rerun). A run is finished when its log holds the final
validation loss or a divergence; finished runs are skipped. Its committed runs were scored before train.py's
fixed evaluation set, each on 40,960 positions drawn with its own seed; a run trained now is scored on the fixed
set, so a continuation mixes the two (the one run it lacks, the 24-block gain_init rerun, would be scored so).

Reports, per depth: each scheme's best rate and mean loss there, the best-against-best gap of each LNS mode to
Pre-LN paired by seed with a 95% t-interval (and, over every depth, the sign test of all those pairs), the rates
within 0.02 nats of each best, and where each scheme fails (diverges, or ends more than FAILED nats above its
best); the same gap between the rates of each scheme's lowest 5-seed mean (the screen picks a best on seed 0
alone); how far training seed 0 again moved its loss, against the seeds' spread; and beta2's effect (seed 0 of the
recipe study's beta2 = 0.95 runs against these at the rates both ran).
Writes experiments/results/tuned_study.json and experiments/figures/tuned_learning_rate_by_depth.png; runs go to
experiments/runs/tuned_study/, whose logs and train.out are committed (another --width: each name ends in _w<width>).
The costly cells on a GPU: experiments/tuned_study_gpu.sh.
"""

import argparse
import math
import os
import statistics
import sys
import time

import recipe_study
from training_runs import (HERE, ROOT, final_val_loss, outcome, pyplot, require_prepared_data, run_plan,
                           run_devices, sign_test, t_interval, threads_per_job, train, write_json)

# scheme name in this study -> train.py settings
SCHEMES = {'pre': ['--norm_scheme=pre'], 'lns': ['--norm_scheme=lns'],
           'lns_gain': ['--norm_scheme=lns', '--lns_mode=gain_init']}
LNS_MODES = ('lns', 'lns_gain')  # each compared with pre
LEARNING_RATES = (5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2)
EDGE_STEP = 2.0  # a grid grown past an edge adds rates this factor apart
SEEDS_AT_BEST, SEEDS_AT_SIGN_CHANGE = 5, 3
TOLERANCE = recipe_study.TOLERANCE  # nats: the window of rates near a scheme's best
FAILED = 0.1  # nats above a scheme's best loss: that rate counts as where the scheme fails
BETA2 = 0.999
RERUN = '_rerun'  # the name of a run trained a second time ends so (run_dir)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--depths', type=int, nargs='+', default=[12, 6, 24], help='in the order they run')
    parser.add_argument('--width', type=int, default=recipe_study.BASE_WIDTH,
                        help='another width writes runs/, results/ and figures/ names ending in _w<width>')
    parser.add_argument('--learning_rates', type=float, nargs='+', default=list(LEARNING_RATES),
                        help='the grid to screen (grown past an edge where a best sits on it)')
    parser.add_argument('--steps', type=int, default=1500)
    parser.add_argument('--jobs', type=int, default=1, help='runs at a time')
    parser.add_argument('--threads', type=int, default=None, help='threads per run (default: cores / jobs)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--compile', type=lambda s: {'true': True, 'false': False}[s.lower()], default=True)
    parser.add_argument('--no_train', action='store_true', help='only report the finished runs')
    parser.add_argument('--runs', default=None, help='default: experiments/runs/tuned_study (_w<width>)')
    parser.add_argument('--beta2_runs', default=os.path.join(HERE, 'runs', 'recipe_study'),
                        help="the recipe study's runs (beta2 0.95), for beta2's effect")
    parser.add_argument('--results', default=os.path.join(HERE, 'results'))
    parser.add_argument('--figures', default=os.path.join(HERE, 'figures'))
    parser.add_argument('--data_dir', default=os.path.join(ROOT, 'data', 'shakespeare_char'))
    args = parser.parse_args(argv)
    args.suffix = '' if args.width == recipe_study.BASE_WIDTH else f'_w{args.width}'  # of every name it writes
    args.runs = args.runs or os.path.join(HERE, 'runs', f'tuned_study{args.suffix}')
    return args


# ----------------------------------------------------------------------------- runs

def run_dir(args, depth, learning_rate, scheme, seed, rerun=False):
    """A run's folder; a rerun (the same settings and seed, trained again) has RERUN after the seed."""
    return os.path.join(args.runs, f"d{depth}_lr{learning_rate:g}_{scheme}_s{seed}{RERUN if rerun else ''}")


def trainer_arguments(args, depth, learning_rate, scheme, seed):
    return [recipe_study.BASE_CONFIG, f'--n_layer={depth}', f'--n_embd={args.width}',
            f'--n_head={args.width // recipe_study.HEAD_SIZE}', *SCHEMES[scheme], f'--beta2={BETA2}',
            f'--learning_rate={learning_rate:g}', f'--min_lr={learning_rate / 10:g}', f'--max_iters={args.steps}',
            f'--warmup_iters={args.steps // 10}', f'--eval_interval={args.steps // 5}',
            f'--log_interval={args.steps // 10}', '--eval_sequences=640', f'--seed={seed}',
            f'--data_dir={args.data_dir}',
            f'--device={args.device}', '--tf32=False', f'--compile={args.compile}']


def losses(args, depth):
    """{scheme: {learning_rate: {seed: final validation loss}}} of the finished runs at a depth (inf: diverged)."""
    found = {scheme: {} for scheme in SCHEMES}
    prefix = f'd{depth}_lr'
    for name in sorted(os.listdir(args.runs)) if os.path.isdir(args.runs) else []:
        if not name.startswith(prefix) or name.endswith(RERUN):
            continue
        rate, rest = name[len(prefix):].split('_', 1)  # run_dir's name: <rate>_<scheme>_s<seed>
        scheme, seed = rest.rsplit('_s', 1)
        rate, seed = float(rate), int(seed)
        if scheme in SCHEMES and outcome(run_dir(args, depth, rate, scheme, seed), args.steps):
            loss = final_val_loss(run_dir(args, depth, rate, scheme, seed))
            found[scheme].setdefault(rate, {})[seed] = loss if math.isfinite(loss) else math.inf
    return found


def mean_loss(by_seed):
    return statistics.mean(by_seed.values())


def best_rate(by_rate):
    """The rate of the lowest mean loss over seed 0 alone (the screen), so that more seeds do not move it."""
    screened = {rate: seeds[0] for rate, seeds in by_rate.items() if 0 in seeds}
    return min(screened, key=screened.get) if screened else None


def grid(depth_losses, learning_rates):
    """The rates to screen: learning_rates and any run already, grown by EDGE_STEP past an edge where a scheme's
    best sits on it."""
    rates = set(learning_rates) | {rate for by_rate in depth_losses.values() for rate in by_rate}
    for by_rate in depth_losses.values():
        best = best_rate(by_rate)
        if best is not None and set(rates) <= set(by_rate):  # the screen of this scheme is complete
            if best == min(rates):
                rates.add(best / EDGE_STEP)
            if best == max(rates) and math.isfinite(by_rate[best][0]):
                rates.add(best * EDGE_STEP)
    return sorted(rates)


def seeds_wanted(depth_losses, rates):
    """{(scheme, rate): seed count} beyond the screen: around each best, and where an LNS mode's gap turns."""
    wanted = {}
    for scheme, by_rate in depth_losses.items():
        best = best_rate(by_rate)
        if best is None or not set(rates) <= set(by_rate):
            continue
        i = rates.index(best)
        for rate in rates[max(0, i - 1):i + 2]:
            wanted[(scheme, rate)] = SEEDS_AT_BEST
    for mode in LNS_MODES:
        gaps = [(rate, depth_losses[mode][rate][0] - depth_losses['pre'][rate][0]) for rate in rates
                if 0 in depth_losses[mode].get(rate, {}) and 0 in depth_losses['pre'].get(rate, {})]
        for (a, gap_a), (b, gap_b) in zip(gaps, gaps[1:]):
            if gap_a * gap_b < 0:  # a diverged run (inf) counts as worse than any finished one
                for scheme in ('pre', mode):
                    for rate in (a, b):
                        wanted[(scheme, rate)] = max(wanted.get((scheme, rate), 0), SEEDS_AT_SIGN_CHANGE)
    return wanted


def plan(args, depth):
    """The runs to do next at a depth: the screen of its grid, else the extra seeds the finished screen asks (those
    at each scheme's best rate first: the best-against-best answer rests on them), else a rerun of seed 0 at each
    scheme's best rate (how far the same run trained again moves its loss)."""
    depth_losses = losses(args, depth)
    rates = grid(depth_losses, args.learning_rates)
    screen = [(depth, rate, scheme, 0) for rate in rates for scheme in SCHEMES
              if 0 not in depth_losses[scheme].get(rate, {})]
    if screen:
        return screen
    bests = {scheme: best_rate(by_rate) for scheme, by_rate in depth_losses.items()}
    seeds = [(depth, rate, scheme, seed) for (scheme, rate), count in seeds_wanted(depth_losses, rates).items()
             for seed in range(count) if seed not in depth_losses[scheme].get(rate, {})]
    if seeds:
        return sorted(seeds, key=lambda run: (run[1] != bests[run[2]], run[3], run[2], run[1]))
    return [(depth, best, scheme, 0, True) for scheme, best in bests.items()
            if not outcome(run_dir(args, depth, best, scheme, 0, rerun=True), args.steps)]


def run_one(args, threads, depth, rate, scheme, seed, rerun=False):
    start = time.time()
    state = train(run_dir(args, depth, rate, scheme, seed, rerun), trainer_arguments(args, depth, rate, scheme, seed),
                  args.steps, threads)
    print(f"{state}: {depth} blocks, lr {rate:g}, {scheme}, seed {seed}{', rerun' if rerun else ''} "
          f"({time.time() - start:.0f} s)", flush=True)


def study(args, threads):
    """Depth by depth, the screen then its extra seeds (a grid grown at an edge is screened first), until nothing
    is left to run; returns the failed runs."""
    failures = []
    for depth in args.depths:
        failures += run_plan(lambda: plan(args, depth), lambda *job: run_one(args, threads, *job), args.jobs,
                             f'{depth} blocks')
    return failures


# ----------------------------------------------------------------------------- report

def depth_report(args, depth):
    depth_losses = losses(args, depth)
    wanted = seeds_wanted(depth_losses, grid(depth_losses, args.learning_rates))
    report = {'depth': depth, 'schemes': {}, 'best_against_best': {}, 'lowest_mean_against_lowest_mean': {}}
    for scheme, by_rate in depth_losses.items():
        best = best_rate(by_rate)
        if best is None:
            continue
        means = {rate: mean_loss(seeds) for rate, seeds in by_rate.items()}
        report['schemes'][scheme] = {
            'best_learning_rate': best, 'best_loss': means[best], 'seeds_at_best': len(by_rate[best]),
            'best_loss_std': statistics.stdev(by_rate[best].values()) if len(by_rate[best]) > 1 else None,
            'within_tolerance': sorted(rate for rate, loss in means.items() if loss <= means[best] + TOLERANCE),
            'fails_at': sorted(rate for rate, loss in means.items() if loss > means[best] + FAILED),
            'by_rate': {f'{rate:g}': {str(seed): loss for seed, loss in seeds.items()}
                        for rate, seeds in sorted(by_rate.items())},
            'rerun': rerun_of_seed_0(args, depth, best, scheme, by_rate[best]),
            'lowest_mean_rate': lowest_mean_rate(scheme, by_rate, wanted)}
    for mode in LNS_MODES:
        for key, rate_key in (('best_against_best', 'best_learning_rate'),
                              ('lowest_mean_against_lowest_mean', 'lowest_mean_rate')):
            rates = {scheme: report['schemes'].get(scheme, {}).get(rate_key) for scheme in ('pre', mode)}
            if None not in rates.values():
                pre, lns = depth_losses['pre'][rates['pre']], depth_losses[mode][rates[mode]]
                paired = [lns[seed] - pre[seed] for seed in sorted(set(pre) & set(lns))]
                report[key][mode] = {'rates': rates, 'gap_mean': statistics.mean(paired), 'seeds': len(paired),
                                     'by_seed': paired, 't_95': t_interval(paired)}
    return report


def lowest_mean_rate(scheme, by_rate, wanted):
    """Beside the screen's best rate (seed 0 alone), the rate whose 5 seeds' mean is lowest: once every rate
    around the best has its 5 seeds, else None (a part-way seed phase would compare the best with itself)."""
    rates = [rate for (name, rate), count in wanted.items() if name == scheme and count == SEEDS_AT_BEST]
    if not rates or any(len(by_rate.get(rate, {})) < SEEDS_AT_BEST for rate in rates):
        return None
    return min(rates, key=lambda rate: mean_loss(by_rate[rate]))


def rerun_of_seed_0(args, depth, rate, scheme, by_seed):
    """Seed 0 at a rate and its rerun, when that has finished: the noise of training the same run twice."""
    folder = run_dir(args, depth, rate, scheme, 0, rerun=True)
    if 0 not in by_seed or not outcome(folder, args.steps):
        return None
    again = final_val_loss(folder)
    return {'learning_rate': rate, 'first': by_seed[0], 'again': again, 'difference': again - by_seed[0]}


def beta2_effect(args, depth):
    """Seed 0 of pre and lns at the rates both studies ran: the recipe study's beta2 0.95 against 0.999 here."""
    rows = []
    for scheme in ('pre', 'lns'):
        for rate in recipe_study.parse_args([]).learning_rates:
            old = os.path.join(args.beta2_runs, f'd{depth}_w{args.width}_lr{rate:g}_base_{scheme}_s0')
            new = run_dir(args, depth, rate, scheme, 0)
            if outcome(old, args.steps) and outcome(new, args.steps):
                rows.append({'scheme': scheme, 'learning_rate': rate, 'beta2_0.95': final_val_loss(old),
                             f'beta2_{BETA2}': final_val_loss(new)})
    return rows


def pooled_signs(reports):
    """Per LNS mode, the exact sign test over every depth's best-against-best paired seeds: (pre lower, LNS lower,
    two-sided p)."""
    return {mode: sign_test([d for report in reports for d in report['best_against_best'].get(mode, {})
                             .get('by_seed', [])]) for mode in LNS_MODES}


def findings(reports, beta2):
    lines = []
    for report in reports:
        for scheme, s in report['schemes'].items():
            lines.append(f"{report['depth']} blocks, {scheme}: best rate {s['best_learning_rate']:g}, loss "
                         f"{s['best_loss']:.4f} ({s['seeds_at_best']} seed(s)); rates within {TOLERANCE} nats: "
                         f"{', '.join(f'{r:g}' for r in s['within_tolerance'])}; more than {FAILED} above its best "
                         f"at: {', '.join(f'{r:g}' for r in s['fails_at']) or 'no rate of the grid'}")
            if s['rerun']:
                spread = f"{s['best_loss_std']:.4f}" if s['best_loss_std'] is not None else 'unknown'
                lines.append(f"{report['depth']} blocks, {scheme}: seed 0 at {s['best_learning_rate']:g} trained "
                             f"again: {s['rerun']['first']:.4f} then {s['rerun']['again']:.4f} "
                             f"({s['rerun']['difference']:+.4f}); seed spread there (std): {spread}")
        for key, words in (('best_against_best', 'best against best'),
                           ('lowest_mean_against_lowest_mean', 'lowest seed mean against lowest seed mean')):
            for mode, b in report[key].items():
                interval = f", t 95% [{b['t_95'][0]:+.4f}, {b['t_95'][1]:+.4f}]" if b['t_95'] else ''
                lines.append(f"{report['depth']} blocks, {words}, {mode} - pre: {b['gap_mean']:+.4f} over "
                             f"{b['seeds']} paired seed(s){interval} ({mode} at {b['rates'][mode]:g}, pre at "
                             f"{b['rates']['pre']:g})")
    for mode, (pre_lower, lns_lower, p) in pooled_signs(reports).items():
        lines.append(f"all depths, best against best, {mode} - pre: pre lower in {pre_lower} paired seed(s), {mode} "
                     f"lower in {lns_lower} (sign test p = {p:.2g})")
    for depth, rows in beta2.items():
        for row in rows:
            lines.append(f"{depth} blocks, {row['scheme']} at {row['learning_rate']:g}, seed 0: beta2 0.95 "
                         f"{row['beta2_0.95']:.4f}, {BETA2} {row[f'beta2_{BETA2}']:.4f}")
    return lines


def plot(args, reports):
    plt = pyplot()
    fig, axes = plt.subplots(2, len(reports), figsize=(4.5 * len(reports), 7), squeeze=False, sharey='row',
                             height_ratios=(3, 2))
    colors = {'pre': 'tab:blue', 'lns': 'tab:orange', 'lns_gain': 'tab:red'}
    for (loss_ax, gap_ax), report in zip(axes.T, reports):
        for scheme, s in report['schemes'].items():
            rates = [float(rate) for rate in s['by_rate']]
            seeds = [list(v.values()) for v in s['by_rate'].values()]
            means = [statistics.mean(v) for v in seeds]
            loss_ax.plot(rates, means, color=colors[scheme], label=scheme)
            for rate, values, mean in zip(rates, seeds, means):
                loss_ax.errorbar(rate, mean, yerr=statistics.stdev(values) if len(values) > 1 else 0, marker='o',
                                 markerfacecolor=colors[scheme] if len(values) > 1 else 'white',
                                 color=colors[scheme], capsize=3, linestyle='none')
        loss_ax.set(xscale='log', xlabel='peak learning rate', ylabel='final validation loss (nats per character)',
                    title=f"{report['depth']} blocks x width {args.width}, beta2 {BETA2}")
        loss_ax.legend(fontsize=8, title='hollow: one seed', title_fontsize=7)
        modes = list(report['best_against_best'])
        for i, mode in enumerate(modes):  # filled: the screen's best rates; hollow: the lowest seed means'
            for shift, key in ((-0.1, 'best_against_best'), (0.1, 'lowest_mean_against_lowest_mean')):
                if mode not in report[key]:
                    continue
                b = report[key][mode]
                low, high = b['t_95'] or (b['gap_mean'], b['gap_mean'])
                gap_ax.errorbar(i + shift, b['gap_mean'], yerr=[[b['gap_mean'] - low], [high - b['gap_mean']]],
                                marker='o', color=colors[mode], capsize=4,
                                markerfacecolor=colors[mode] if shift < 0 else 'white')
        gap_ax.axhline(0, color='black', linewidth=0.8)
        gap_ax.set_xticks(range(len(modes)), [f"{m} - pre ({report['best_against_best'][m]['seeds']} seeds)"
                                              for m in modes])
        gap_ax.set(xlim=(-0.5, len(modes) - 0.5), ylabel='LNS - pre, 95% t-interval (nats)',
                   title='filled: screen best; hollow: lowest seed mean')
    fig.tight_layout()
    os.makedirs(args.figures, exist_ok=True)
    path = os.path.join(args.figures, f'tuned_learning_rate_by_depth{args.suffix}.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv):
    args = parse_args(argv)
    require_prepared_data(args.data_dir)
    failures = [] if args.no_train else study(args, threads_per_job(args.jobs, args.threads))
    reports = [depth_report(args, depth) for depth in args.depths]
    reports = [report for report in reports if report['schemes']]
    if not reports:
        sys.exit(f"error: no finished runs in {args.runs}; nothing written (train first: drop --no_train)")
    beta2 = {depth: beta2_effect(args, depth) for depth in args.depths}
    lines = findings(reports, beta2)
    devices = run_devices(args.runs)
    write_json(os.path.join(args.results, f'tuned_study{args.suffix}.json'), {
        'settings': {'steps': args.steps, 'width': args.width, 'beta2': BETA2, 'schemes': SCHEMES,
                     'tolerance_nats': TOLERANCE, 'failed_nats': FAILED, 'devices': devices},
        'findings': lines, 'depths': reports, 'beta2_effect': beta2})
    print('\n'.join(lines))
    print(f"wrote {plot(args, reports)}")
    if failures:
        sys.exit(f"error: {len(failures)} run(s) failed; the first: {failures[0]}")


if __name__ == '__main__':
    main(sys.argv[1:])

"""The sweeps behind the tables in docs/ (metricrl.py runs), and Agent, a run's policy (model.pt).

--compare runs methods x data qualities x maps; --assumptions, runs where one of MetricRL's
assumptions breaks, and its fixes; --observations, each map from one-hot cells, coordinates
and images, with cells held out of the data, and with moves one way only; --scaling, the
hypermazes of d = 2, 3, 4 (--envs: others) with metricrl, td and gcbc; --continuous, the
paper's continuous benchmarks (metricrl_continuous.py: PointMaze, FetchReach).

    python experiments.py --compare --env maze     # 60 runs: compare.md and compare.png
    python experiments.py --assumptions            # 30 runs: assumptions.md and .png
    python experiments.py --observations           # 66 runs: observations.md and .png
    python experiments.py --scaling --seeds 1      # 9 runs: scaling.md and .png
    python experiments.py --continuous             # 75 runs of metricrl_continuous.py
    python experiments.py --help                   # a run's knobs and the sweeps' own

Each row runs --seeds times (from --seed on), each run into its own folder; a sweep started
again reads its finished runs back and runs the rest. The knobs a sweep does not set in a row
go to every run (--steps 400, say) and name its folder. metricrl never imports this file."""
import contextlib
import dataclasses
import json
import math
import os
import re
import sys

import numpy as np
import torch
from matplotlib.figure import Figure

import metricrl
from metricrl import Args, UsageError, say


@dataclasses.dataclass
class SweepArgs(Args):  # a run's knobs, and the sweeps' own: each comment is its --help text
    compare: bool = False  # run methods x data qualities, write compare.md and compare.png
    algos: str = "metricrl,metricrl-linear,gcbc,td"  # methods; metricrl-exact, -bfs, -quasimetric
    epsilons: str = "0,0.25,0.5,0.75,1"  # --compare: behaviour epsilons
    envs: str = ""  # maps: --compare's (default: --env), --scaling's (default: d = 2 to 4)
    assumptions: bool = False  # runs where each assumption breaks: assumptions.md, .png
    observations: bool = False  # features x maps, held-out cells, one-way data: observations.md
    scaling: bool = False  # hypermazes (--envs, or d = 2 to 4) x metricrl, td, gcbc: scaling.md
    continuous: bool = False  # metricrl_continuous.py: PointMaze, FetchReach x methods x data
    seeds: int = 3  # seeds per row, from --seed on


@dataclasses.dataclass
class Sweep:
    """What a sweep's table shows, and which knobs its rows set."""
    labels: tuple  # the columns that name a row
    columns: tuple  # the metrics shown, mean ± std over the seeds
    knobs: tuple  # the knobs a row sets; a row that does not set one runs its default


SWEEPS = {
    "compare": Sweep(("env", "method", "ε"), ("data_reward", "success_task", "critic_success_task",
                                              "success_rate", "path_ratio", "optimal_action_rate",
                                              "critic_success_rate", "distance_error", "seconds"),
                     ("env", "algo", "weighting", "critic", "metric", "epsilon")),
    "assumptions": Sweep(("experiment", "map", "variant"),
                         ("success_rate", "path_ratio", "optimal_action_rate",
                          "value_greedy_rate", "critic_success_rate", "spearman"),
                         ("env", "algo", "weighting", "critic", "metric", "slip", "data",
                          "super_state")),
    "observations": Sweep(("experiment", "map", "features"),
                          ("success_rate", "critic_success_rate", "success_seen", "success_unseen",
                           "critic_success_seen", "critic_success_unseen", "seconds"),
                          ("env", "features", "holdout", "data", "episodes")),
    "scaling": Sweep(("map", "method"), ("success_rate", "critic_success_rate",
                     "optimal_action_rate", "cells", "actions", "seconds"), ("env", "algo")),
    "continuous": Sweep(("env", "method", "data"),
                        ("success_rate", "path_ratio", "spearman", "monotonicity", "seconds"),
                        ("env", "algo", "advantage", "data", "epsilon")),
}
VARIANTS = {  # --algos: a method's name in --compare, and the knobs that make it
    "metricrl": {}, "metricrl-linear": {"weighting": "linear"},
    "gcbc": {"algo": "gcbc"}, "td": {"algo": "td"},
    "metricrl-bfs": {"critic": "bfs"}, "metricrl-exact": {"critic": "exact"},
    "metricrl-quasimetric": {"metric": "quasimetric"},
}


def assumption_rows():
    """--assumptions' rows, ((experiment, map, variant), knobs): each assumption broken, with
    the fix the paper or the literature offers, on the maps where it matters."""
    rows = []
    for env in ("oneway", "maze"):  # one-way doors: no inverse action
        rows.append((("invertible actions", env, "euclidean"), {"env": env}))
        rows.append((("invertible actions", env, "quasimetric"),
                     {"env": env, "metric": "quasimetric"}))
    for p in (0, 0.1, 0.3):
        rows.append((("deterministic moves", "maze", f"slip {p:g}"), {"slip": p}))
    split = {"env": "rooms", "data": "split"}
    rows.append((("connected data", "rooms", "all data"), {"env": "rooms"}))
    rows.append((("connected data", "rooms", "split"), split))
    rows.append((("connected data", "rooms", "split + super-state"),
                 {**split, "super_state": True}))
    return rows


def observation_rows(args):
    """--observations' rows: each map from each kind of observation, with all its cells in
    the data and with 10% held out; on maze, moves one way only, and all moves as many (not
    for --algo gcbc or td: their hindsight goals need whole trajectories)."""
    rows = []
    for env in ("maze", "rooms", "open"):
        for features in ("onehot", "xy", "image"):
            knobs = {"env": env, "features": features}
            rows.append((("all cells", env, features), knobs))
            rows.append((("10% held out", env, features), {**knobs, "holdout": 0.1}))
    if args.algo != "metricrl":  # no one-direction rows
        return rows
    for features in ("onehot", "xy"):  # 200 trajectories one way: 14,874 transitions, seed 0
        rows.append((("one direction", "maze", features),
                     {"features": features, "data": "one-direction"}))
        rows.append((("all, as many", "maze", features), {"features": features, "episodes": 149}))
    return rows


def scaling_rows(args):
    """--scaling's rows: each map of --envs (default: hypermaze2s5 to 4s5) x metricrl, td, gcbc."""
    envs = listed(args.envs) or [f"hypermaze{d}s5" for d in (2, 3, 4)]
    for env in envs:  # a bad map fails now, not in an hour
        metricrl.setup(dataclasses.replace(args, env=env))
    return [((env, algo), {"env": env, "algo": algo}) for env in envs
            for algo in ("metricrl", "td", "gcbc")]


def continuous_rows():
    """--continuous' rows (metricrl_continuous.py): each PointMaze x metricrl, gcbc, td on random
    actions; on UMaze and Medium also the paper's one-step advantage and the authors' OU data
    (Large's: beyond 3 hours of 2 cores); FetchReach x epsilon (random to scripted) x metricrl,
    gcbc."""
    rows = []
    for env in ("umaze", "medium", "large"):
        for algo in ("metricrl", "gcbc", "td"):
            rows.append(((env, algo, "random"), {"env": env, "algo": algo}))
    for env in ("umaze", "medium"):
        rows.append(((env, "metricrl-one-step", "random"), {"env": env, "advantage": "one-step"}))
        for algo in ("metricrl", "gcbc"):
            rows.append(((env, algo, "OU"), {"env": env, "algo": algo, "data": "ou"}))
    for eps in (1.0, 0.75, 0.5, 0.25, 0.0):
        for algo in ("metricrl", "gcbc"):
            knobs = {"env": "reach", "algo": algo, "epsilon": eps}
            rows.append((("reach", algo, f"ε = {eps:g}"), knobs))
    return rows


def listed(text):
    """A comma-separated flag's values, stripped, each once, in order."""
    values = [value.strip() for value in text.split(",")]
    return list(dict.fromkeys(value for value in values if value))


def compare_rows(args):
    """--compare's rows, ((map, method, epsilon), knobs): every map x method x epsilon."""
    algos = listed(args.algos)
    unknown = [name for name in algos if name not in VARIANTS]
    if unknown or not algos:
        name = unknown[0] if unknown else ""
        raise UsageError(f"--algos: unknown {name!r}; choose from {', '.join(VARIANTS)}")
    epsilons = []
    for text in listed(args.epsilons):
        if not re.fullmatch(r"\d+\.?\d*|\.\d+", text) or float(text) > 1:
            raise UsageError(f"--epsilons must be numbers in [0, 1], got {args.epsilons!r}")
        epsilons.append(float(text))
    if not epsilons:
        raise UsageError(f"--epsilons must be numbers in [0, 1], got {args.epsilons!r}")
    envs = listed(args.envs) or [args.env]
    for env in envs:  # a bad map fails now, not in an hour
        metricrl.setup(dataclasses.replace(args, env=env))
    rows = []
    for env in envs:
        map_name = os.path.splitext(os.path.basename(env))[0]
        for name in algos:
            for eps in dict.fromkeys(epsilons):
                knobs = {"env": env, **VARIANTS[name], "epsilon": eps}
                rows.append(((map_name, name, f"{eps:g}"), knobs))
    return rows


def check_sweep(args, given):
    """Raise UsageError for a flag the sweep cannot honour; -> the sweep's name."""
    metricrl.check_args(args)
    metricrl.require(args, "seeds", args.seeds > 0, "positive")
    modes = [name for name in SWEEPS if getattr(args, name)]
    if len(modes) > 1:
        raise UsageError(f"--{modes[0]} and --{modes[1]} are two modes: use one")
    if not modes:
        raise UsageError("give --compare, --assumptions, --observations, --scaling or "
                         "--continuous (one run: python metricrl.py)")
    mode = modes[0]
    per_row = set(SWEEPS[mode].knobs)
    if mode == "compare":
        per_row.discard("env")  # --compare's map, unless --envs lists several
    clash = sorted(given & per_row)
    if clash:
        raise UsageError(f"--{clash[0].replace('_', '-')}: --{mode} sets it in each row")
    return mode


def given_knobs(base):
    """The knobs a sweep passes to all its runs, for its folder's name: "-steps=400", or ""."""
    knobs = type(base)  # metricrl.py's Args, or metricrl_continuous.py's
    plain = knobs(env=base.env, algo=base.algo, seed=base.seed)  # the same without them
    head = metricrl.run_name(plain, knobs()).removesuffix(f"-s{base.seed}")  # <map>-<algo>
    tail = metricrl.run_name(base, knobs()).removeprefix(head)  # -<knobs>-s<seed>
    return tail.removesuffix(f"-s{base.seed}")


def run_args(args, given, knobs=Args, **changes):
    """A run's knobs (knobs: a file's Args): the flags given that it has, else its defaults."""
    names = {field.name for field in dataclasses.fields(knobs)} & set(given)
    return dataclasses.replace(knobs(**{name: getattr(args, name) for name in names}), **changes)


def sweep(args, name, given=()):
    """The sweep `name` (compare, ...): each row's runs, a line each, the table and figure."""
    module = metricrl
    if name == "continuous":  # its runs: metricrl_continuous.py's, with their own knobs
        import metricrl_continuous as module
    defaults = {knob: getattr(module.Args(), knob) for knob in SWEEPS[name].knobs}
    base = run_args(args, given, module.Args, **defaults, quiet=True)  # what rows start from
    folder = [name]
    if name == "compare":
        rows = compare_rows(args)
        folder += dict.fromkeys(label[0] for label, _ in rows)  # the maps
    elif name == "assumptions":
        rows = assumption_rows()
    elif name == "scaling":
        rows = scaling_rows(args)
    elif name == "continuous":
        rows = continuous_rows()
    else:
        rows = observation_rows(args)
    if base.algo != module.Args().algo:  # --observations --algo td: not the default's folder
        folder.append(base.algo)
    root = args.out or os.path.join("runs", "-".join(folder) + given_knobs(base))
    cells = []
    for label, knobs in rows:
        for seed in range(args.seed, args.seed + args.seeds):
            cell = dataclasses.replace(base, **knobs, seed=seed)
            module.check_args(cell)
            cell.out = os.path.join(root, metricrl.run_name(cell, base))
            cells.append((label, cell))
    done = sum(finished(cell) is not None for _, cell in cells)
    say(f"--{name}: {len(cells)} run(s) in {root}, {done} done before")
    results, spent = {}, []  # spent: the seconds of each run made now, for the time left
    for k, (label, cell) in enumerate(cells, 1):
        metrics = finished(cell) or dict(module.run(cell), fresh=True)
        results.setdefault(label, []).append(metrics)
        if "fresh" in metrics:
            spent.append(metrics["seconds"])
        say(run_line(k, len(cells), cell, metrics, spent))
    table = sweep_table(args, SWEEPS[name], results, metrics["device"])
    with metricrl.staged(root, (f"{name}.md", f"{name}.png")) as tmp:
        with open(os.path.join(tmp, f"{name}.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        sweep_plot(os.path.join(tmp, f"{name}.png"), name, SWEEPS[name].labels, results)
    say(table)
    say(f"wrote {os.path.join(root, name)}.md and {name}.png")
    return results


def finished(cell):
    """The metrics.json of a finished run with the same knobs (output aside), or None."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError):
        with open(os.path.join(cell.out, "metrics.json"), encoding="utf-8") as f:
            metrics = json.load(f)
        saved = {**dataclasses.asdict(type(cell)()), **metrics["flags"]}  # added since: default
        for key in ("out", "device", "quiet"):  # where and how verbosely: the same result
            saved[key] = getattr(cell, key)
        same = all(saved[key] == value for key, value in dataclasses.asdict(cell).items())
        if same and metrics["success_rate"] >= 0:
            return metrics
    return None


def run_line(k, total, cell, metrics, spent):
    """A sweep's progress line for its k-th run; the time left from the mean run made so far."""
    critic = "critic success", metrics.get("critic_success_rate", math.nan)
    if "critic_success_rate" not in metrics:  # metricrl_continuous.py's: the critic's Spearman
        critic = "spearman", metrics["spearman"]
    scores = f"success {metrics['success_rate']:.3f}  {critic[0]} {critic[1]:.3f}"
    scores = scores.replace("nan", "  —")
    left = "done before"
    if "fresh" in metrics:
        left = f"about {(total - k) * np.mean(spent) / 60:.1f} min left"
    folder = os.path.basename(cell.out)
    return f"[{k:3d}/{total}] {folder:40s} {scores}  {metrics['seconds']:5.1f} s | {left}"


def mean_std(runs, key):
    """Mean and std of a metric over the seeds' runs, leaving out runs without it (nan)."""
    values = np.array([run.get(key, math.nan) for run in runs])
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan
    return values.mean(), values.std()


def table_cell(column, runs, seeds):
    """A table's cell: mean ± std over the seeds (seconds: the mean alone), or — if none."""
    mean, std = mean_std(runs, column)
    if math.isnan(mean):
        return "—"
    if column in ("seconds", "cells", "actions"):  # the mean alone
        return f"{mean:.1f}".removesuffix(".0")
    if seeds > 1:
        return f"{mean:.3f} ± {std:.3f}"
    return f"{mean:.3f}"


def sweep_table(args, sweep_kind, results, device):
    """The Markdown table: a line saying how it was made, then a row per label."""
    made = f"Steps {args.steps or 'by the map'}, {args.seeds} seed(s)"
    if args.seeds > 1:
        made += ", mean ± std"
    made += f"; {os.cpu_count()} CPU cores, torch {torch.__version__}, device {device}."
    every = [run for row in results.values() for run in row]
    columns = [key for key in sweep_kind.columns if any(key in run for run in every)]  # a map's
    header = sweep_kind.labels + tuple(columns)
    lines = [made, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for label, runs in results.items():
        cells = [table_cell(column, runs, args.seeds) for column in columns]
        lines.append("| " + " | ".join([*label, *cells]) + " |")
    return "\n".join(lines)


def sweep_plot(path, name, labels, results):
    """A bar per row, the actor's success (mean ± std over seeds); a diamond, its critic's.
    The rows are grouped, with a gap and a colour, by the first label that varies."""
    rows = list(results)[::-1]  # top to bottom
    varies = [i for i in range(len(labels)) if len({row[i] for row in rows}) > 1]
    by = varies[0] if varies else 0
    groups = list(dict.fromkeys(row[by] for row in rows))
    gaps = np.cumsum([0] + [a[by] != b[by] for a, b in zip(rows, rows[1:])])
    at = np.arange(len(rows)) + gaps  # (R,) each row's place, a gap between groups
    success = [mean_std(results[row], "success_rate") for row in rows]
    critic = [mean_std(results[row], "critic_success_rate")[0] for row in rows]
    fig = Figure(figsize=(10, 1.4 + 0.3 * at[-1]), layout="constrained")
    ax = fig.subplots()
    colors = [f"C{groups.index(row[by])}" for row in rows]
    ax.barh(at, [mean for mean, _ in success], xerr=[std for _, std in success], capsize=3,
            ecolor="0.5", color=colors)
    if not np.isnan(critic).all():  # metricrl_continuous.py's runs: no critic's own policy
        ax.plot(critic, at, "kD", ms=6, label="its critic's own greedy policy (mean)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(at, [" · ".join(row) for row in rows], fontsize=8)
    ax.set(xlim=(0, 1.02), xlabel=f"success over all pairs ({' · '.join(labels)})",
           title=f"--{name}: the actor's success (bars: mean ± std over seeds)")
    fig.savefig(path, dpi=80)


class Agent:
    """A run's trained policy, from its model.pt: Agent(path).act(states, goals), coordinates
    (B, D) -> actions (B,); .env, .args, .history, .x, .critic, .actor for analyses."""
    def __init__(self, path, device="cpu"):
        ckpt = dict(torch.load(path, map_location=device, weights_only=True))
        knobs = {k: v for k, v in ckpt["args"].items() if k in Args.__annotations__}
        self.args, self.history = Args(**knobs), ckpt["history"]
        self.env = metricrl.gridworld.GridWorld(ckpt["layout"])
        self.x, self.critic, self.actor = metricrl.build(self.env, self.args, device)
        if self.critic is not None:
            self.critic.load_state_dict(ckpt["critic"])
        self.actor.load_state_dict(ckpt["actor"])

    @torch.no_grad()
    def act(self, states, goals):
        s = torch.as_tensor(np.atleast_1d(self.env.cell_indices(states)), device=self.x.device)
        g = torch.as_tensor(np.atleast_1d(self.env.cell_indices(goals)), device=self.x.device)
        s, g = torch.broadcast_tensors(s, g)
        seen = metricrl.actor_input(self.critic, self.x, self.args)
        return self.actor(seen, s, g).argmax(-1).cpu().numpy()


def replace_unknown_characters():
    """A console that cannot show ε shows \\u03b5 (Windows' cp1252, LC_ALL=C)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")


def main(argv=None):
    """The command line: python experiments.py --compare|--assumptions|... (one sweep)."""
    replace_unknown_characters()
    try:
        args, given = metricrl.parse_args(argv, SweepArgs)
        name = check_sweep(args, given)
        return sweep(args, name, given)
    except (UsageError, FloatingPointError, KeyboardInterrupt) as e:
        metricrl.exit_with_one_line("experiments.py", e)


if __name__ == "__main__":
    main()

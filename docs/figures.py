"""Redraws every figure in docs/figures/ with the code in hand, from the commands that make it.

    python -m docs.figures --list        # each figure and the commands that make its runs
    python -m docs.figures               # all of them: about 4.5 h on 2 cores, 3 h of it continuous
    python -m docs.figures exact.png     # one: its runs first, unless they are finished

Run it from the repository's root. A figure is a file that a run or a sweep writes, copied
here, or one drawn here from finished runs (exact.png, scale.png, images.png,
doorkey.png). A run whose
metrics.json exists with the same flags is not run again; sweeps resume on their own."""
import dataclasses
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
from matplotlib.figure import Figure

import experiments
import gridworld
import metricrl

HERE = os.path.join("docs", "figures")
ORACLE = ("python experiments.py --compare --algos metricrl,metricrl-bfs "
          "--envs open,rooms,maze,loops,maze25 --epsilons 1")
EXACT = ("python experiments.py --compare --algos metricrl-exact "
         "--envs open,rooms,maze,loops,oneway,maze25 --epsilons 1")
DOORKEY = ("python experiments.py --compare --env doorkey --algos metricrl,metricrl-quasimetric,"
           "gcbc,td --epsilons 0,0.75,0.8,0.85,0.9,0.95,1")
ORACLE_RUNS = "runs/compare-open-rooms-maze-loops-maze25"
EXACT_RUNS = "runs/compare-open-rooms-maze-loops-oneway-maze25"


def draw_exact(path):
    """Learned against true distance on maze and maze25: the paper's critic, --critic exact."""
    fig = Figure(figsize=(18, 4.4), layout="constrained")
    runs = [f"{ORACLE_RUNS}/maze-metricrl-s0", f"{EXACT_RUNS}/maze-metricrl-critic=exact-s0",
            f"{ORACLE_RUNS}/maze25-metricrl-s0", f"{EXACT_RUNS}/maze25-metricrl-critic=exact-s0"]
    for ax, run in zip(fig.subplots(1, 4), runs):
        distance_bands(ax, experiments.Agent(f"{run}/model.pt"))
    fig.suptitle("Learned against true distance over all pairs, random data, seed 0")
    fig.savefig(path, dpi=70)


def distance_bands(ax, agent):
    """The learned distance of every pair against its BFS distance: median and 10-90%."""
    d = agent.env.distance_matrix()
    dz = metricrl.critic_distances(agent.critic, agent.x, agent.args).cpu().numpy()
    true, learned = d[d > 0], dz[d > 0]
    steps = np.arange(1, true.max() + 1)
    bands = np.array([np.percentile(learned[true == t], [10, 50, 90]) for t in steps])
    ax.fill_between(steps, bands[:, 0], bands[:, 2], alpha=0.3, label="10–90% of pairs")
    ax.plot(steps, bands[:, 1], label="median")
    ax.plot(steps, steps, "k--", lw=1, label="learned = true")
    critic = {"paper": "the paper's critic", "exact": "--critic exact"}[agent.args.critic]
    error = abs(learned - true).mean()
    ax.set(title=f"{agent.args.env}, {critic}\nmean |d_φ − d| {error:.2f}",
           xlabel="true distance d(s, g) (BFS)", ylabel="learned d_φ(s, g)")
    ax.legend(fontsize=8, loc="upper left")


def draw_scale(path):
    """Success against the map's size: the critic's own policy, its actor, the oracle's actor."""
    maps = {"maze": ORACLE_RUNS, "maze25": ORACLE_RUNS, "maze51": "runs"}
    paper = [metrics(f"{root}/{m}-metricrl-s0") for m, root in maps.items()]
    bfs = [metrics(f"{root}/{m}-metricrl-critic=bfs-s0") for m, root in maps.items()]
    cells = [run["cells"] for run in paper]
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(cells, [run["critic_success_rate"] for run in paper], "o-",
            label="the paper's critic, its own greedy policy")
    ax.plot(cells, [run["success_rate"] for run in paper], "s--",
            label="the actor, with the paper's critic")
    ax.plot(cells, [run["success_rate"] for run in bfs], "^-",
            label="the actor, with --critic bfs (exact distances)")
    ax.set(xscale="log", xlabel="free cells", ylabel="success over all pairs", ylim=(0, 1.02),
           title="Larger mazes: random data, default flags, seed 0")
    ax.set_xticks(cells, [f"{m}\n{n:,}" for m, n in zip(maps, cells)])
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=80)


def draw_images(path):
    """What phi reads with --features image: two cells at tile 2, one at tile 8."""
    env = gridworld.GridWorld("maze")
    corner = int(np.argmax(env.distance_matrix()[0]))  # the far end from cell 0
    shown = [(0, 2), (corner, 2), (corner, 8)]
    fig = Figure(figsize=(10.5, 4.2), layout="constrained")
    for ax, (cell, tile) in zip(fig.subplots(1, 3), shown):
        image = gridworld.ImageObservation(env, tile).images([cell])[0]  # (H, W, 3)
        ax.imshow(image)
        where = tuple(env.cells[cell].tolist())
        size = " x ".join(map(str, image.shape))
        ax.set(title=f"the agent in {where}\n--tile {tile}: {size}", xticks=[], yticks=[])
    fig.suptitle("What φ reads with --features image: the map, the agent's cell in blue "
                 "(the CNN pads each image to 8 m + 9 pixels a side)")
    fig.savefig(path, dpi=80)


def draw_doorkey(path):
    """The paper's Fig. 1 on doorkey: each method's success on the paper's task (and over all
    pairs) against the data's own expected reward on that task, mean ± std over the seeds."""
    runs = [metrics(os.path.dirname(f)) for f in glob.glob("runs/compare-doorkey/*/metrics.json")]
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    panels = (("success_task", "the paper's task: from the start (no key) past the door"),
              ("success_rate", "all reachable pairs (s, g) of the 168 states"))
    for ax, (key, what), place in zip(fig.subplots(1, 2), panels, ("center left", "lower center")):
        for method in ("metricrl", "metricrl-quasimetric", "gcbc", "td"):
            mine = [run for run in runs if method_name(run) == method]
            qualities = sorted({run["flags"]["epsilon"] for run in mine})
            rows = [[run for run in mine if run["flags"]["epsilon"] == eps] for eps in qualities]
            x = [np.mean([run["data_reward"] for run in row]) for row in rows]
            y = np.array([[run[key] for run in row] for row in rows])  # (qualities, seeds)
            ax.errorbar(x, y.mean(1), yerr=y.std(1), marker="o", capsize=3, label=method)
        if key == "success_task":  # the data's own success on the same task
            ax.plot([0, 1], [0, 1], "k:", lw=1, label="the data's own reward")
        ax.set(xlim=(-0.02, 1.02), ylim=(0, 1.02), title=f"Success on {what}",
               xlabel="the data's expected reward on the task (random data: left; expert: right)",
               ylabel="success (mean ± std, 3 seeds)")
        ax.legend(fontsize=8, loc=place)
    fig.suptitle("The paper's Figure 1 in the exact world: doorkey (a key, a locked door), "
                 "data from ε-random behaviour")
    fig.savefig(path, dpi=80)


def method_name(run):
    """A run's method, as --algos names it: the variant of experiments.VARIANTS whose knobs it
    has, each knob a variant leaves out at its default."""
    defaults = dataclasses.asdict(metricrl.Args())
    knobs = {knob for variant in experiments.VARIANTS.values() for knob in variant}
    for name, variant in experiments.VARIANTS.items():
        wanted = {**{knob: defaults[knob] for knob in knobs}, **variant}
        if all(run["flags"][knob] == value for knob, value in wanted.items()):
            return name
    return None


FIGURES = {  # name: (the commands that make its runs, the file they write or a drawing)
    "metricrl.png": (["python metricrl.py --env maze"], "runs/maze-metricrl-s0/metricrl.png"),
    "compare.png": (["python experiments.py --compare --env maze"],
                    "runs/compare-maze/compare.png"),
    "oracle.png": ([ORACLE], f"{ORACLE_RUNS}/compare.png"),
    "scale.png": ([ORACLE, "python metricrl.py --env maze51",
                   "python metricrl.py --env maze51 --critic bfs"], draw_scale),
    "exact.png": ([ORACLE, EXACT], draw_exact),
    "assumptions.png": (["python experiments.py --assumptions"],
                        "runs/assumptions/assumptions.png"),
    "images.png": ([], draw_images),
    "doorkey.png": ([DOORKEY], draw_doorkey),
    "doorkey-run.png": (["python metricrl.py --env doorkey"],
                        "runs/doorkey-metricrl-s0/metricrl.png"),
    "observations.png": (["python experiments.py --observations --seeds 1"],
                         "runs/observations/observations.png"),
    "hypermaze.png": (["python metricrl.py --env hypermaze4s5"],
                      "runs/hypermaze4s5-metricrl-s0/metricrl.png"),
    "scaling.png": (["python experiments.py --scaling --seeds 1"], "runs/scaling/scaling.png"),
    "continuous.png": (["python experiments.py --continuous"], "runs/continuous/continuous.png"),
    "continuous-medium.png": (["python metricrl_continuous.py --env medium"],
                              "runs/medium-metricrl-s0/metricrl_continuous.png"),
}


def metrics(folder):
    """A finished run's metrics.json."""
    with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def one_run(argv):
    """The knobs of `python SCRIPT FLAGS` (one run), its folder set as the run sets it."""
    module = metricrl
    if argv[0] == "metricrl_continuous.py":
        import metricrl_continuous as module  # MuJoCo's imports, only where needed
    args, _ = metricrl.parse_args(argv[1:], module.Args)
    out = args.out or os.path.join("runs", metricrl.run_name(args, module.Args()))
    return dataclasses.replace(args, out=out)


def run_once(command):
    """Run a command of FIGURES, unless it is one run finished before with the same flags."""
    argv = shlex.split(command)[1:]  # the script and its flags
    if argv[0] != "experiments.py" and experiments.finished(one_run(argv)) is not None:
        return print(f"finished before: {command}")
    print(f"running: {command}", flush=True)
    subprocess.run([sys.executable, *argv], check=True)


def main(names):
    """Redraw the figures named (all without names); --list: say what makes each."""
    if names == ["--list"]:
        for name, (commands, source) in FIGURES.items():
            drawn = f"drawn by docs/figures.py: {source.__name__}" if callable(source) else source
            print(f"{HERE}/{name}: {'; '.join(commands) or 'no runs'} -> {drawn}")
        return
    unknown = [name for name in names if name not in FIGURES]
    if unknown:  # bad input: one line, exit code 2, as the scripts'
        print(f"figures: error: unknown figure {unknown[0]!r}; choose from {', '.join(FIGURES)}",
              file=sys.stderr)
        sys.exit(2)
    for name in names or FIGURES:
        commands, source = FIGURES[name]
        for command in commands:
            run_once(command)
        path = os.path.join(HERE, name)
        if callable(source):
            source(path)
        else:
            shutil.copyfile(source, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])

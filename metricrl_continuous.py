"""MetricRL (Reichlin et al., arXiv 2402.10820) on the paper's continuous benchmarks: PointMaze
(their Maze2D) and FetchReach (their Reach). A state and an action are real vectors; no table.

    python metricrl_continuous.py --env umaze       # PointMaze_UMaze-v3 (also medium, large)
    python metricrl_continuous.py --env maze9       # a map of gridworld.py, as a PointMaze
    python metricrl_continuous.py --env reach --epsilon 0.5   # FetchReach-v4, half scripted
metricrl.py's sibling, in its order: 1-7 the method (data, critic, value and advantage, actor,
baselines, training, evaluation); 8-10 one run, its figure, the command line. Shapes: M
transitions, B batch, K environment copies, S state, G goal, U action, k latent sizes."""
import contextlib
import copy
import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from typing import Literal

import gymnasium
import mujoco
import numpy as np
import torch
import torch.nn as nn
from matplotlib.figure import Figure

import gridworld
import metricrl
from metricrl import UsageError, advantage_weights, latent_distance, say, spearman

with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # a notice on Adroit
    import gymnasium_robotics
gymnasium.register_envs(gymnasium_robotics)  # PointMaze and FetchReach


@dataclasses.dataclass
class Args:  # each knob's comment is its --help text
    env: str = "umaze"  # umaze, medium, large (PointMaze), reach (FetchReach), or a gridworld map
    algo: Literal["metricrl", "gcbc", "td"] = "metricrl"  # or a baseline: gcbc, td
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    seed: int = 0  # seeds the data, the networks and the test episodes
    data: Literal["random", "ou"] = "random"  # PointMaze's behaviour: uniform, or the authors' OU
    epsilon: float = 1.0  # FetchReach's: a random action with this probability, else scripted
    episodes: int = 0  # offline episodes; 0: 1,000 on PointMaze, 2,000 on FetchReach
    fourier: int = 4  # phi reads each coordinate and its sin, cos at L frequencies; 0: as it is
    latent: int = 64  # k, the size of the embedding phi(s)
    hidden: int = 256  # width of the hidden layers of phi, pi, b and td's V
    lam: float = 1.0  # lambda, weight of the negative (push) term
    gamma: float = 0.99  # discount in V(s, g) = gamma^d(s, g)
    advantage: Literal["centred", "one-step"] = "centred"  # A - b(s, g); one-step: the paper's A
    weighting: Literal["exp", "linear"] = "exp"  # linear: w = A (the authors' code)
    beta: float = 6.0  # inverse temperature of the exp weights
    w_max: float = 100.0  # clip of the exp weights
    expectile: float = 0.7  # td: expectile of the TD target
    batch: int = 512  # transitions a step, for the critic and for the actor
    steps: int = 0  # gradient steps; 0: 800 a PointMaze cell, 10,000 at least; FetchReach 5,000
    critic_only: float = 0.2  # share of the steps that train the critic alone (not gcbc)
    lr: float = 1e-3  # Adam learning rate; the actor's (and b's) falls linearly to 0
    tests: int = 0  # test episodes; 0: 1,000 (PointMaze: every pair of cells once, if more)
    eval_every: int = 0  # a quick evaluation (100 test episodes) every this many steps; 0: 5 a run
    out: str = ""  # output folder (default: runs/<env>-<algo>-<knobs changed>-s<seed>)
    quiet: bool = False  # print nothing (the files are written all the same)


ALIASES = {"umaze": "PointMaze_UMaze-v3", "medium": "PointMaze_Medium-v3",
           "large": "PointMaze_Large-v3", "reach": "FetchReach-v4"}
OU_THETA, OU_SIGMA = 0.1, 0.2  # the authors' Ornstein-Uhlenbeck process (d4rl/)
FETCH_STEP = 0.05  # FetchReach moves the gripper 5 cm per unit of action
COPIES = 32  # environment copies stepped in lockstep, one batched forward pass of pi a step
SIGMA = 1.0  # pi's standard deviation, fixed (the authors'); its mean acts at test time
TARGET_RATE = 0.005  # td: V_target moves this share of the way to V a step (IQL's)


@dataclasses.dataclass
class Task:  # what a run needs of its environment, fixed by setup()
    env_id: str  # the Gymnasium id
    kwargs: dict  # for gymnasium.make: maze_map, continuing_task
    limit: int  # steps an episode may last
    radius: float  # success: the achieved goal this close to the goal (the environment's rule)
    success_key: str  # info's key for the environment's own success flag
    goal_size: int  # G: a state's first G coordinates are its achieved goal
    maze: gridworld.GridWorld = None  # PointMaze: its cells, BFS's truth; FetchReach: None

    def make(self):  # one copy of the environment
        return gymnasium.make(self.env_id, max_episode_steps=self.limit, **self.kwargs)


# ============================================================================ 1. data
def behaviour(args, task, rng, obs, goal, previous):
    """The data's actions (K, U): uniform in [-1, 1]; --data ou: the authors' a = (1 - theta) a_prev
    + sigma z, z uniform, a memory of 1 / theta = 10 steps, clipped as the environment does;
    FetchReach: uniform with probability epsilon, else straight at the goal, 5 cm at most."""
    uniform = rng.uniform(-1, 1, previous.shape)
    if task.maze is None:
        delta = goal - obs[:, :3]  # (K, 3)
        scale = np.maximum(np.abs(delta).max(1, keepdims=True), FETCH_STEP)
        scripted = np.concatenate([delta / scale, np.zeros((len(obs), 1))], axis=1)
        return np.where(rng.random((len(obs), 1)) < args.epsilon, uniform, scripted)
    if args.data == "random":
        return uniform
    return np.clip((1 - OU_THETA) * previous + OU_SIGMA * uniform, -1, 1)


def run_episodes(task, envs, starts, policy, stop_at_success=False):
    """Episodes in lockstep, len(envs) at a time, from starts (reset kwargs); one call a step of
    policy(obs (K, S), goal (K, G), previous actions (K, U)) -> (K, U) for the K still running
    -> per episode: observations (T + 1, S), actions (T, U), success, steps T."""
    episodes = []
    for first in range(0, len(starts), len(envs)):
        chunk = list(zip(envs, starts[first:first + len(envs)]))
        obs = [env.reset(**start)[0] for env, start in chunk]
        paths = [[o["observation"]] for o in obs]
        moves = [[] for _ in chunk]
        success, ended = [False] * len(chunk), [False] * len(chunk)
        previous = np.zeros((len(chunk), envs[0].action_space.shape[0]))  # OU starts at 0
        live = list(range(len(chunk)))
        for _ in range(task.limit):
            now = np.stack([paths[i][-1] for i in live])  # (K, S)
            goal = np.stack([obs[i]["desired_goal"] for i in live])  # (K, G)
            previous[live] = policy(now, goal, previous[live])
            for i in live:
                obs[i], _, ended[i], _, info = chunk[i][0].step(previous[i])
                paths[i].append(obs[i]["observation"])
                moves[i].append(previous[i].copy())
                success[i] = success[i] or bool(info[task.success_key])
            live = [i for i in live if not ended[i] and not (stop_at_success and success[i])]
            if not live:
                break
        for path, taken, reached in zip(paths, moves, success):  # float32: the data's
            episodes.append((np.float32(path), np.float32(taken), reached, len(taken)))
    return episodes


def collect_dataset(task, args, rng):
    """--episodes of the behaviour, ended at their goal (after it, s' = s: no move to pull to 1)
    -> float32 s, a, s2 (M, S or U), int64 end (M,): each row's episode's last row; share reached"""
    envs = [task.make() for _ in range(COPIES)]
    policy = functools.partial(behaviour, args, task, rng)
    episodes, tick = [], time.time()
    while len(episodes) < args.episodes:  # blocks of 8 K episodes, a line every 10 s
        seeds = rng.integers(2**31, size=min(args.episodes - len(episodes), 8 * COPIES))
        episodes += run_episodes(task, envs, [{"seed": int(seed)} for seed in seeds], policy, True)
        if not args.quiet and time.time() - tick > 10:
            say(f"collecting data: {len(episodes):,}/{args.episodes:,} episodes")
            tick = time.time()
    paths, moves, reached, steps = zip(*episodes)
    s = np.concatenate([path[:-1] for path in paths])  # (M, S)
    s2 = np.concatenate([path[1:] for path in paths])
    ends = np.repeat(np.cumsum(steps) - 1, steps)  # (M,)
    return {"s": s, "a": np.concatenate(moves), "s2": s2, "end": ends}, float(np.mean(reached))


def cached_dataset(task, args, folder):
    """collect_dataset()'s data, kept in folder, named by a hash of all that defines it."""
    key = [task.env_id, task.kwargs, task.limit, args.data, args.epsilon, args.episodes]
    key += [args.seed, mujoco.__version__, gymnasium_robotics.__version__, "format 2"]
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]
    path = os.path.join(folder, f"{task.env_id}-{digest}.npz")
    if os.path.exists(path):
        with np.load(path) as saved:
            return {key: saved[key] for key in ("s", "a", "s2", "end")}, float(saved["reached"])
    data, reached = collect_dataset(task, args, np.random.default_rng(args.seed))
    partial = f"{path}.partial-{os.getpid()}"
    try:  # written whole, then renamed: a run stopped halfway leaves no broken file
        os.makedirs(folder, exist_ok=True)
        with open(partial, "wb") as f:
            np.savez(f, **data, reached=reached)
        os.replace(partial, path)
    except OSError as e:  # a full disk, say
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise UsageError(f"cannot keep the data in {folder} ({e.strerror})") from None
    return data, reached


def sample(data, n, goals):
    """n transitions (s, a, s') and goals (n, G), achieved by any data state (random, the
    paper's) or by a later one of the same episode (hindsight, GCBC's)."""
    i = torch.randint(len(data["s"]), (n,), device=data["s"].device)
    j = torch.randint(len(data["s"]), (n,), device=data["s"].device)
    if goals == "hindsight":  # a uniform row of [i, end(i)]: a later step of the same episode
        span = data["end"][i] - i + 1
        j = i + (torch.rand(n, device=span.device) * span).long()
    return data["s"][i], data["a"][i], data["s2"][i], data["g2"][j]


# =========================================================== 2. critic (paper Sec. 3)
class Features(nn.Module):
    """x (B, D) standardized by the data's statistics (kept in model.pt), and with L > 0 each
    coordinate's sin and cos at L frequencies pi 2^l / 2 -> (B, D (1 + 2L)) (departure: docs)."""
    def __init__(self, x, fourier=0):
        super().__init__()
        self.register_buffer("mean", x.mean(0))
        self.register_buffer("std", x.std(0).clamp(min=1e-3))  # a constant coordinate stays 0
        self.register_buffer("scales", math.pi * 2.0 ** torch.arange(fourier) / 2)  # (L,)
        self.size = x.shape[1] * (1 + 2 * fourier)

    def forward(self, x):
        x = (x - self.mean) / self.std  # (B, D)
        angles = (x[:, :, None] * self.scales).flatten(1)  # (B, D L)
        return torch.cat([x, angles.sin(), angles.cos()], dim=1)


def mlp(inputs, hidden, outputs):  # two hidden layers of ReLUs
    layers = [nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, outputs))


class PairNet(nn.Module):
    """An MLP on [s; g], (B, S), (B, G) -> (B, outputs): pi's mean, td's V(s, g), or b(s, g)."""
    def __init__(self, data, hidden, outputs):
        super().__init__()
        self.s_in, self.g_in = Features(data["s"]), Features(data["g2"])
        self.body = mlp(self.s_in.size + self.g_in.size, hidden, outputs)

    def forward(self, s, g):
        return self.body(torch.cat([self.s_in(s), self.g_in(g)], dim=1))


def build(data, args):
    """The critic (phi, td's V(s, g), gcbc's None), the actor, b (--advantage centred, or None)."""
    actor = PairNet(data, args.hidden, data["a"].shape[1])  # the mean of pi, before tanh
    if args.algo == "gcbc":
        return None, actor, None
    baseline = PairNet(data, args.hidden, 1) if args.advantage == "centred" else None
    if args.algo == "td":
        return PairNet(data, args.hidden, 1), actor, baseline
    x = Features(data["s"], args.fourier)  # phi: S -> k (departure: theirs is residual)
    return nn.Sequential(x, mlp(x.size, args.hidden, args.latent)), actor, baseline


def metric_loss(z, z2, args):
    """The critic's loss (Sec. 3) on B transitions s_i -> s'_i, z = phi(s), z2 = phi(s') (B, k),
    metricrl.py's on a minibatch:
      positive = mean_i            (||z_i - z2_i|| - 1)^2
      negative = mean_(i != j)     -log ||z_i - z2_j||
      loss     = positive + lambda * negative"""
    positive = ((latent_distance(z, z2) - 1) ** 2).mean()
    others = 1 - torch.eye(len(z), device=z.device)  # (B, B), the pairs i != j
    negative = metricrl.weighted_mean(-torch.log(torch.cdist(z, z2) + 1e-6), others)
    return positive + args.lam * negative, {"positive": positive, "negative": negative}


# ======================================= 3. value (Sec. 3.1) and advantage (Sec. 3.3)
def goal_state(g, size):
    """Goals (B, G) as states (B, S) for phi: at rest, the other coordinates 0 (the authors')."""
    return torch.cat([g, g.new_zeros(len(g), size - g.shape[1])], dim=1)


def distance(critic, s, g, args):
    """The critic's d(s, g) (B,): metricrl's ||phi(s) - phi(g)||, in steps; td's log_gamma V."""
    if args.algo == "td":
        return metricrl.td_distance(critic(s, g)[:, 0], args.gamma)
    return latent_distance(critic(s), critic(goal_state(g, s.shape[1])))


def actor_weights(critic, baseline, s, s2, g, args):
    """w (B,), b's loss. The paper's one-step A = d(s, g) - d(s', g) is mostly the drift of the
    velocity s has (an action changes s' little), which d hardly sees; centred, A - b(s, g), b
    the data's mean A from s to g, keeps what the action changed (departure: docs). gcbc: 1."""
    if critic is None:
        return torch.ones(len(s), device=s.device), 0.0
    with torch.no_grad():
        progress = distance(critic, s, g, args) - distance(critic, s2, g, args)  # (B,) A
    if baseline is None:
        return advantage_weights(progress, torch.zeros_like(progress), args), 0.0
    b = baseline(s, g)[:, 0]  # (B,)
    fit = ((progress - b) ** 2).mean()  # b -> E[A | s, g] under the data's actions
    return advantage_weights(progress, b.detach(), args), fit  # exp(beta (A - b)), clipped


# ================================================================ 4. actor (Sec. 3.3)
def actor_loss(mean, a, w):
    """Weighted imitation, -mean_i w_i log pi(a_i | s_i, g_i): mean = tanh(pi's output), a (B, U),
    w (B,), with log pi = log N(a; mean, SIGMA^2 I), summed over the U coordinates."""
    log_pi = -0.5 * ((a - mean) / SIGMA) ** 2 - math.log(SIGMA * math.sqrt(2 * math.pi))
    return -(w * log_pi.sum(1)).mean()


# ========================= 5. baselines: the same data and actor, another critic or none
def td_loss(v, v_target, data, task, args):
    """td, the critic MetricRL replaces, on a batch s, s' (B, S), g (B, G) (half hindsight):
      y    = gamma * (1 if s' is within the environment's radius of g else V_target(s', g))
      loss = mean |tau - 1(y < V(s, g))| (y - V(s, g))^2     expectile regression (IQL)"""
    with torch.no_grad():  # V_target moves TARGET_RATE of the way to V (Polyak)
        for p_target, p in zip(v_target.parameters(), v.parameters()):
            p_target.lerp_(p, TARGET_RATE)
    s, _, s2, later = sample(data, args.batch, "hindsight")  # a later state of s's episode
    other = data["g2"][torch.randint(len(s2), (args.batch,), device=s2.device)]  # any state
    g = torch.where(torch.rand(args.batch, 1, device=s2.device) < 0.5, later, other)  # (B, G)
    with torch.no_grad():
        reached = (s2[:, :g.shape[1]] - g).norm(dim=1) <= task.radius
        y = args.gamma * torch.where(reached, 1.0, v_target(s2, g)[:, 0])  # (B,)
    u = y - v(s, g)[:, 0]
    tau = torch.where(u < 0, 1 - args.expectile, args.expectile)
    loss = (tau * u ** 2).mean()
    return loss, {"td_loss": loss}


# ========================================================== 6. training (Algorithm 1)
def train(data, nets, task, args, log):
    """Algorithm 1: the critic alone for the first `critic_only` share of the steps, then both in
    one backward pass (gcbc: the actor only); the actor's learning rate falls linearly to 0."""
    critic, actor, baseline = nets
    actor_from = int(args.critic_only * args.steps) if critic is not None else 0
    groups = [{"params": net.parameters()} for net in nets if net is not None]
    optimizer = torch.optim.Adam(groups, lr=args.lr, fused=True)  # fused: no host sync
    target = copy.deepcopy(critic) if args.algo == "td" else None
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups[int(critic is not None):]:  # pi's (and b's)
            group["lr"] = args.lr * min(1.0, (args.steps - step + 1) / (args.steps - actor_from))
        loss, info = 0.0, {}
        if args.algo == "td":
            loss, info = td_loss(critic, target, data, task, args)
        elif critic is not None:  # the paper's, on phi of B transitions s -> s'
            i = torch.randint(len(data["s"]), (args.batch,), device=data["s"].device)
            loss, info = metric_loss(critic(data["s"][i]), critic(data["s2"][i]), args)
        if critic is not None:
            info["critic_loss"] = loss
        if step > actor_from:  # the actor (Sec. 3.3) and b; gcbc's goals: hindsight (w = 1)
            s, a, s2, g = sample(data, args.batch, "hindsight" if critic is None else "random")
            w, fit = actor_weights(critic, baseline, s, s2, g, args)  # (B,)
            info["actor_loss"] = actor_loss(torch.tanh(actor(s, g)), a, w)
            loss = loss + info["actor_loss"] + fit
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.add(step, info)
    return log.history


# ================================================= 7. evaluation (the environment's own)
@torch.no_grad()
def greedy(actor, device, obs, goal, previous):
    """pi's mean action tanh(mu(s, g)), the Gaussian's noise off: (K, S), (K, G) -> (K, U)."""
    s = torch.as_tensor(obs, dtype=torch.float32, device=device)
    g = torch.as_tensor(goal, dtype=torch.float32, device=device)
    return torch.tanh(actor(s, g)).cpu().numpy()


def ground_truth(task, data, envs, args):
    """The test episodes' resets, each its seed (the noise): FetchReach --tests seeds (0: 1,000);
    PointMaze every ordered pair of cells as reset options, seeded order, repeated to --tests (0:
    1,000, or each pair once); 100 for quick evaluations. The critic's probe s (N, S), g (N, G),
    true d (N, N): PointMaze the cells' centres at rest, BFS; FetchReach data states, Euclidean."""
    seed, rng = 10**6 * args.seed, np.random.default_rng(args.seed)
    starts = [{"seed": seed + k} for k in range(args.tests or 1000)]  # FetchReach's
    if task.maze is not None:
        start, goal = np.nonzero(~np.eye(len(task.maze.cells), dtype=bool))  # (P (P - 1),) each
        order = np.resize(rng.permutation(len(start)), args.tests or max(1000, len(start)))
        cells = task.maze.cells  # (P, 2) rows and columns
        options = [{"reset_cell": cells[start[i]], "goal_cell": cells[goal[i]]} for i in order]
        starts = [{"seed": seed + k, "options": option} for k, option in enumerate(options)]
    truth = {"starts": starts, "quick": np.sort(rng.permutation(len(starts))[:100])}
    if task.maze is not None:  # PointMaze's x, y of cell (row, col): the map's centre at 0, 0
        (height, width), (rows, cols) = task.maze.grid.shape, task.maze.cells.T
        centres = np.stack([cols + 0.5 - width / 2, height / 2 - rows - 0.5], axis=1)  # (P, 2)
        truth["g"] = torch.tensor(centres, dtype=torch.float32, device=data["s"].device)
        truth["s"] = goal_state(truth["g"], data["s"].shape[1])
        truth["d"] = torch.tensor(task.maze.distance_matrix(), device=data["s"].device)
        return truth
    rows = torch.as_tensor(rng.choice(len(data["s"]), 256))
    truth["s"] = data["s"][rows]
    truth["g"] = truth["s"][:, :task.goal_size]  # their grippers: d(s_i, g_j) vs ||p_i - p_j||
    truth["d"] = torch.cdist(truth["g"], truth["g"])
    controller = functools.partial(behaviour, dataclasses.replace(args, epsilon=0.0), task, rng)
    scripted = run_episodes(task, envs, starts, controller, stop_at_success=True)
    truth["scripted_steps"] = np.array([steps for *_, steps in scripted])  # for path_ratio
    return truth


def evaluate(critic, actor, task, envs, truth, which, args):
    """The greedy actor on the test episodes `which`, and the critic against the truth."""
    starts = [truth["starts"][i] for i in which]
    policy = functools.partial(greedy, actor, truth["s"].device)
    episodes = run_episodes(task, envs, starts, policy, stop_at_success=True)
    reached = np.array([success for _, _, success, _ in episodes])
    steps = np.array([steps for *_, steps in episodes])
    metrics = dict.fromkeys(METRICS, math.nan) | {"success_rate": reached.mean()}
    if "scripted_steps" in truth and reached.any():  # FetchReach: against the straight line
        metrics["path_ratio"] = (steps / truth["scripted_steps"][which])[reached].mean()
    if critic is not None:  # [i, j] = d(s_i, g_j) (N, N), and s_i != g_j (with a path)
        n = len(truth["s"])
        with torch.no_grad():
            dz = distance(critic, truth["s"].repeat_interleave(n, 0), truth["g"].repeat(n, 1), args)
        dz, off = dz.view(n, n), truth["d"] > 0
        metrics["spearman"] = spearman(dz[off], truth["d"][off].double())
        metrics["monotonicity"] = metricrl.monotonicity(dz, truth["d"], seed=args.seed)
    return {key: float(value) for key, value in metrics.items()}, episodes


# ====================================================== 8. one run, from data to files
OUTPUTS = ("metrics.json", "log.csv", "model.pt", "metricrl_continuous.png")
METRICS = ("success_rate", "path_ratio", "spearman", "monotonicity")


def run(args):
    """One run: the data (kept on disk) -> critic and actor -> evaluation -> files in --out."""
    start = time.time()
    task, device = setup(args)
    out = args.out or os.path.join("runs", metricrl.run_name(args, Args()))
    maze = task.maze is not None  # --episodes, --steps, --eval-every 0: measured (docs)
    steps = args.steps or (max(10000, 800 * len(task.maze.cells)) if maze else 5000)
    episodes = args.episodes or (1000 if maze else 2000)
    every = args.eval_every or math.ceil(steps / 5)
    given, args = args, dataclasses.replace(args, episodes=episodes, steps=steps, eval_every=every)
    folder = os.path.join(os.path.dirname(os.path.abspath(out)), "datasets")
    with metricrl.staged(out, OUTPUTS) as tmp:  # an unwritable --out fails before the data
        data, reached = cached_dataset(task, args, folder)  # in the run folder's parent
        torch.manual_seed(args.seed)
        data = {key: torch.as_tensor(column, device=device) for key, column in data.items()}
        data["g2"] = data["s2"][:, :task.goal_size]  # (M, G) the achieved goal of each s'
        nets = [None if net is None else net.to(device) for net in build(data, args)]
        envs = [task.make() for _ in range(COPIES)]
        truth = ground_truth(task, data, envs, args)
        if not args.quiet:
            say(f"{task.env_id}: {len(data['s']):,} transitions, {reached:.3f} of the data's "
                f"episodes reach their goal | {device} | {args.steps} steps")
        history = train(data, nets, task, args, Progress(args, nets, task, envs, truth))
        tests = range(len(truth["starts"]))  # every test episode
        metrics, episodes = evaluate(*nets[:2], task, envs, truth, tests, args)
        plot_run(os.path.abspath(out), tmp, task, args, nets[0], truth, episodes, history, metrics)
        seconds = round(time.time() - start, 2)
        metrics.update(env=args.env, env_id=task.env_id, algo=args.algo, seed=args.seed)
        metrics.update(device=str(device), steps=args.steps, tests=len(episodes), seconds=seconds)
        metrics.update(transitions=len(data["s"]), data_success=reached, flags=vars(given))
        write_files(tmp, task, args, nets, history, metrics)
    if not args.quiet:
        say(f"wrote {os.path.join(out, '')} ({', '.join(OUTPUTS)}) in {seconds:.1f} s")
        shown = [key for key in METRICS if not math.isnan(metrics[key])]  # PointMaze: no path ratio
        say("\n".join(f"  {key:13s} {metrics[key]:.3f}" for key in shown))
    return metrics


class Progress(metricrl.Progress):
    """metricrl.py's log (its rows: no host sync in a step), a quick evaluation under each row."""
    def __init__(self, args, nets, task, envs, truth):
        super().__init__(args, nets[0], nets[1], None, None)  # None: no table of metricrl.py's
        self.nets, self.task, self.envs, self.reference = nets, task, envs, truth

    def add(self, step, info):
        super().add(step, info)
        if step % self.args.eval_every == 0 or step == self.args.steps:  # a row was written
            quick = evaluate(*self.nets[:2], self.task, self.envs, self.reference,
                             self.reference["quick"], self.args)[0]
            self.history[-1].update(quick)
            self.tick = time.time()  # the next row's speed: training steps only
            if not self.args.quiet:
                say(f"{'':13s}quick evaluation: success {quick['success_rate']:.3f}, the critic's "
                    f"Spearman {quick['spearman']:.3f}")


# ======================================================================== 9. the figure
def plot_run(folder, tmp, task, args, critic, truth, episodes, history, metrics):
    """metricrl_continuous.png: PointMaze's maze (plot_maze), the quick evaluations, the losses."""
    rows = 1 + (task.maze is not None)  # the maze's panels on top
    fig = Figure(figsize=(19, 5 * rows))
    axes = fig.subplots(rows, 3).reshape(rows, 3)
    if task.maze is not None:
        plot_maze(fig, axes[0], task, args, critic, truth, episodes)
    panels = {"success_rate": 0, "spearman": 0, "monotonicity": 0,  # path_ratio: in the title
              "positive": 1, "negative": 1, "td_loss": 1, "actor_loss": 2}
    for key, k in panels.items():  # the quick evaluations, the critic's and the actor's losses
        points = [row for row in history if not math.isnan(row.get(key, math.nan))]
        if points:
            steps = [row["step"] for row in points]
            axes[-1, k].plot(steps, [row[key] for row in points], "o-", label=key)
    names = ("Quick evaluations (100 tests or fewer)", "The critic's losses", "The actor's loss")
    for ax, name in zip(axes[-1], names):
        ax.set(title=name, xlabel="gradient step")
        if ax.lines:  # gcbc's critic: none
            ax.legend(fontsize=8)
    shown = [f"{key} {metrics[key]:.3f}" for key in METRICS if not math.isnan(metrics[key])]
    fig.suptitle(f"{os.path.basename(folder)}: {len(episodes)} test episodes, {', '.join(shown)}")
    fig.subplots_adjust(left=0.05, right=0.95, bottom=0.1 / rows, top=1 - 0.17 / rows,
                        wspace=0.35, hspace=0.3)
    fig.savefig(os.path.join(tmp, "metricrl_continuous.png"), dpi=70)  # moved to folder after


def plot_maze(fig, axes, task, args, critic, truth, episodes):
    """The critic's V(s, g) over positions at rest, the BFS distance to g's cell, rollouts to g."""
    d = task.maze.distance_matrix()
    goal = int(np.argmax(d.max(0)))  # the hardest goal cell: the farthest from some cell
    height, width = task.maze.grid.shape
    extent = (-width / 2, width / 2, -height / 2, height / 2)  # x, y of the map's edges
    true = np.full(task.maze.grid.shape, np.nan)
    true[tuple(task.maze.cells.T)] = d[:, goal]
    shown = axes[1].imshow(true, extent=extent, cmap="Blues_r")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.03, label="BFS distance (cells)")
    axes[1].set_title("True distance of each cell to g's cell")
    if critic is not None:  # V = gamma^d on a log scale: the colours follow d
        x = np.linspace(extent[0], extent[1], 10 * width)
        y = np.linspace(extent[3], extent[2], 10 * height)  # rows from the top
        where = np.stack(np.meshgrid(x, y), axis=-1).reshape(-1, 2)  # (10 H 10 W, 2) positions
        where = torch.tensor(where, dtype=torch.float32, device=truth["g"].device)
        s, g = goal_state(where, truth["s"].shape[1]), truth["g"][goal].expand(len(where), -1)
        with torch.no_grad():
            v = metricrl.value(distance(critic, s, g, args), args.gamma).cpu().numpy()
        shown = axes[0].imshow(v.reshape(len(y), len(x)), extent=extent, norm="log")
        fig.colorbar(shown, ax=axes[0], fraction=0.046, pad=0.03, label="V (log scale)")
        axes[0].set_title(r"Learned $V(s, g) = \gamma^{d(s, g)}$ at rest")
    goal_cells = np.array([start["options"]["goal_cell"] for start in truth["starts"]])
    to_goal = [e for e, cell in zip(episodes, goal_cells) if (cell == task.maze.cells[goal]).all()]
    for path, _, success, _ in to_goal[::max(1, len(to_goal) // 15)]:  # about 15 of them
        axes[2].plot(path[:, 0], path[:, 1], color="green" if success else "red", lw=1.5)
        axes[2].plot(path[0, 0], path[0, 1], "o", color="k", ms=4)
    reached = sum(success for _, _, success, _ in to_goal)
    axes[2].set_title(f"Test rollouts to g ({reached} of {len(to_goal)} reach it; o: starts)")
    for ax in axes:  # the walls, dark grey
        ax.imshow(np.where(task.maze.grid == gridworld.WALL, 1.0, np.nan), extent=extent,
                  cmap="Greys", vmin=0, vmax=1.2)
        ax.plot(*truth["g"][goal].tolist(), "*", color="white", ms=18, mec="k")
        ax.set(xticks=[], yticks=[])


# =================================================== 10. files, checkpoints, command line
def write_files(folder, task, args, nets, history, metrics):
    """model.pt (a plain dict: networks, flags, environment, log), log.csv, metrics.json."""
    ckpt = {"history": history, "args": dataclasses.asdict(args), "env": task.env_id}
    for name, net in zip(("critic", "actor", "b"), nets):
        ckpt[name] = None if net is None else net.state_dict()
    torch.save(ckpt | task.kwargs, os.path.join(folder, "model.pt"))  # and the maze
    with open(os.path.join(folder, "log.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, list(dict.fromkeys(key for row in history for key in row)))
        writer.writeheader()
        writer.writerows(history)
    with open(os.path.join(folder, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)


def check_args(args):
    """Raise UsageError for a value that a run cannot use."""
    for name in ("lr", "w_max", "hidden", "latent"):
        metricrl.require(args, name, getattr(args, name) > 0, "positive")
    for name in ("seed", "episodes", "steps", "eval_every", "tests", "fourier", "lam", "beta"):
        metricrl.require(args, name, getattr(args, name) >= 0, "0 or more")
    metricrl.require(args, "batch", args.batch >= 2, "2 or more (the push needs pairs)")
    metricrl.require(args, "epsilon", 0 <= args.epsilon <= 1, "in [0, 1]")
    metricrl.require(args, "critic_only", 0 <= args.critic_only < 1, "in [0, 1)")
    metricrl.require(args, "gamma", 0 < args.gamma < 1, "in (0, 1)")
    metricrl.require(args, "expectile", 0 < args.expectile < 1, "in (0, 1)")
    for name, setting in dataclasses.asdict(args).items():
        metricrl.require(args, name, type(setting) is not int or setting < 2**31, "below 2^31")
        metricrl.require(args, name, type(setting) is not float or math.isfinite(setting), "finite")


def setup(args):
    """The environment, checked (it runs here), and the device -> task, device. A PointMaze ends
    at its goal; on a map of gridworld.py, walled, it has 50 steps a cell of its diameter (the
    registered mazes: 42 to 55), at least 300."""
    device = metricrl.pick_device(args.device)
    env_id = ALIASES.get(args.env, args.env)
    registered = env_id in gymnasium.registry
    if registered and env_id.startswith("FetchReach"):
        task = Task(env_id, {}, 50, 0.05, "is_success", 3)  # success: within 5 cm
    elif registered and env_id.startswith("PointMaze_"):
        spec = gymnasium.spec(env_id)
        task = maze_task(env_id, spec.kwargs["maze_map"], spec.max_episode_steps)
    else:  # a map of gridworld.py: a name, a file or the rows
        try:
            world = gridworld.GridWorld(args.env)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--env: {e}; or umaze, medium, large, reach") from None
        if world.grid.ndim != 2 or world.one_way.any() or (world.distance_matrix() < 0).any():
            raise UsageError(f"--env {args.env!r}: a PointMaze needs a connected 2-D map without "
                             "one-way cells")
        metricrl.require(args, "env", len(world.cells) <= 200, "200 cells or fewer (every pair "
                         "is a test episode)")
        walls = np.pad(world.grid == gridworld.WALL, 1, constant_values=True)  # (H + 2, W + 2)
        limit = max(300, 50 * int(world.distance_matrix().max()))
        task = maze_task("PointMaze_UMaze-v3", walls.astype(int).tolist(), limit)
    try:
        task.make().reset(seed=0)
    except Exception as e:  # FetchReach fails inside gymnasium-robotics on mujoco >= 3.12
        raise UsageError(f"--env {args.env}: {env_id} does not run here ({type(e).__name__}, "
                         f"mujoco {mujoco.__version__}): pip install -r requirements.txt") from None
    return task, device


def maze_task(env_id, maze_map, limit):
    """A PointMaze on maze_map (1: wall); its cells and their BFS distances by gridworld.py."""
    text = "\n".join("".join("#" if cell == 1 else "." for cell in row) for row in maze_map)
    kwargs = {"maze_map": maze_map, "continuing_task": False}  # an episode ends at its goal
    return Task(env_id, kwargs, limit, 0.45, "success", 2, gridworld.GridWorld(text))


def main(argv=None):
    """The command line: python metricrl_continuous.py [knobs] runs one run; returns its metrics."""
    try:
        args, _ = metricrl.parse_args(argv, Args)
        check_args(args)
        return run(args)
    except (UsageError, FloatingPointError, KeyboardInterrupt) as e:
        metricrl.exit_with_one_line("metricrl_continuous.py", e)


if __name__ == "__main__":
    main()

"""MetricRL on a gridworld, measured exactly against the BFS truth.

Reichlin, Vasco, Yin, Kragic. "Learning Goal-Conditioned Policies from Sub-Optimal
Offline Data via Metric Learning", arXiv 2402.10820.

    python metricrl.py --env maze                  # CPU or GPU, whichever is there
    python metricrl.py --env maze --device cuda    # on a GPU
    python metricrl.py --env rooms --epsilon 0.5   # half-expert data
    python metricrl.py --load runs/maze-metricrl-s0/model.pt   # re-evaluate a checkpoint
    python metricrl.py --algo gcbc                 # a baseline: gcbc or td
    python metricrl.py --compare --env maze        # every method on data of every quality
    python metricrl.py --env oneway --metric quasimetric   # one-way doors, asymmetric d_phi
    python metricrl.py --assumptions               # where the assumptions break

The file reads top to bottom in the paper's order: knobs (Args), offline data,
the metric critic phi (Sec. 3), the value V = gamma^d (Sec. 3.1) and the advantage,
the weighted-imitation actor (Sec. 3.3), the baselines' critics, training (Algorithm 1),
the exact evaluation; then plots, checkpoints, the command line, --compare and
--assumptions.

Shapes: N free cells, B batch, F features per cell, k latent size, P (state, goal) pairs.
"""
import time

START = time.time()  # "seconds" in metrics.json counts from here: launch to figure written

import argparse  # noqa: E402
import copy  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import gymnasium  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gridworld  # noqa: E402

matplotlib.use("Agg")  # draw to files; no screen needed
import matplotlib.pyplot as plt  # noqa: E402


NEGATIVES = ("log", "inverse", "raw")  # shapes of the critic's push, see push()


def knob(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Args:
    env: str = knob("maze", "map: open, rooms, maze, loops, oneway, maze<N> (odd N >= 7) or a "
                            "map file")
    algo: str = knob("metricrl", "metricrl (the paper); gcbc: goal-conditioned behaviour cloning, "
                                 "no critic; td: the same actor, its critic a value learned by TD",
                     ("metricrl", "gcbc", "td"))
    device: str = knob("auto", "auto, cpu, cuda or cuda:N")
    seed: int = knob(0, "seeds the data and the networks (the evaluation is exact)")
    # data
    episodes: int = knob(0, "offline trajectories; 0: sized to the map, 200 per 128 cells")
    episode_len: int = knob(100, "steps per trajectory (the authors' MiniGrid setting)")
    epsilon: float = knob(1.0, "behaviour policy: random action with this probability, "
                               "else a shortest-path move (1.0: purely random data)")
    features: str = knob("onehot", "state features: onehot (of the cell) or xy (coordinates)",
                         ("onehot", "xy"))
    slip: float = knob(0.0, "probability that a move slips to another direction, in the data "
                            "and in the evaluation's rollouts (then seeded, not exact)")
    data: str = knob("all", "all: one dataset of the whole map; split: the left and right "
                            "halves collected apart, never a move across", ("all", "split"))
    super_state: bool = knob(False, "join the last state of every trajectory to one virtual "
                                    "state (all-zero features), as the paper's fix for split data")
    # critic
    latent: int = knob(32, "k, the size of the embedding phi(s)")
    hidden: int = knob(128, "width of the hidden layers of phi and pi")
    lam: float = knob(1.0, "lambda, weight of the contrastive (negative) term")
    metric: str = knob("euclidean", "d_phi: euclidean (the paper), or quasimetric (asymmetric, "
                                    "for one-way moves)", ("euclidean", "quasimetric"))
    objective: str = knob("paper", "critic loss: paper (pull to 1, push with --negative), or "
                                   "constrained (push apart, subject to d(s, s') <= 1)",
                          ("paper", "constrained"))
    negative: str = knob("log", "shape of the push on pairs at latent distance d: log, -log d "
                                "(the paper); inverse, 1/d (short range); raw, -d (no transform)",
                         NEGATIVES)
    # value and actor
    gamma: float = knob(0.99, "discount in V(s, g) = gamma^d(s, g)")
    weighting: str = knob("exp", "exp: w = min(exp(beta A), w_max); "
                                 "linear: w = V(s') - V(s) with V = -d (the authors' code)",
                          ("exp", "linear"))
    beta: float = knob(6.0, "inverse temperature of the exp weights")
    w_max: float = knob(100.0, "clip of the exp weights")
    goals: str = knob("auto", "the actor's goals: random dataset states, or hindsight (a later "
                              "state of the same trajectory); auto: hindsight for gcbc, "
                              "else random",
                      ("auto", "random", "hindsight"))
    expectile: float = knob(0.7, "td: expectile of the TD target (0.5: the data's average move, "
                                 "towards 1: its best)")
    # optimisation (the authors: Adam 1e-3, batch 256, 100 epochs x 500 batches, critic
    # alone for 10 epochs; these converge in 2600 steps on every named map, see README)
    steps: int = knob(2600, "gradient steps in all")
    critic_only: float = knob(0.2, "share of the steps that train the critic alone")
    batch_size: int = knob(0, "critic batch: 0, the whole dataset, summed per pair of cells; "
                              "B > 0, B random transitions (the push compares B x B pairs)")
    actor_batch: int = knob(1024, "(transition, goal) samples per actor step")
    lr: float = knob(3e-3, "Adam learning rate (the actor's falls linearly to 0)")
    # outputs
    eval_every: int = knob(500, "exact evaluation every this many steps")
    out: str = knob("", "output folder (default runs/<env>-<algo>-s<seed>)")
    load: str = knob("", "re-evaluate this model.pt, rewrite metrics.json and metricrl.png "
                          "beside it (or in --out); no training")
    quiet: bool = knob(False, "no progress lines")
    bench: bool = knob(False, "benchmark: training steps/s at several batch sizes and "
                              "evaluation pairs/s on --device, written to bench.json")
    # comparison grid: one run per (env, negative, algo, epsilon, seed), see compare()
    compare: bool = knob(False, "run the grid below, then write compare.md and compare.png")
    algos: str = knob("metricrl,metricrl-linear,gcbc,td", "--compare: methods")
    epsilons: str = knob("0,0.25,0.5,0.75,1", "--compare: behaviour epsilons (0 expert, 1 random)")
    seeds: int = knob(3, "--compare: seeds per cell, from --seed on")
    envs: str = knob("", "--compare: maps (default: --env)")
    negatives: str = knob("log", "--compare: push shapes (metricrl only)")
    assumptions: bool = knob(False, "run the experiments where MetricRL's assumptions break "
                                    "(--seeds each), then write assumptions.md and .png")


# ============================================================================ 1. data
def size_to_map(args, env):
    """The data-size rule, for --episodes 0: 200 trajectories per 128 cells, rounded up
    (200 on the named maps, 600 on maze25, 2,000 on maze51)."""
    return dataclasses.replace(args, episodes=args.episodes or 200 * math.ceil(len(env.cells) / 128))


def collect_dataset(env, args, rng):
    """Offline data: `episodes` trajectories of `episode_len` steps, all run at once.

    Behaviour: a uniformly random action with probability epsilon, else a shortest-path
    action towards a target cell (drawn per episode, and again when reached). With
    --slip p the move goes in one of the other three directions with probability p (the
    data records the action chosen). With --data split the map's left and right halves
    are collected apart: a move across stays in place, as if a wall stood between them.
    Returns int64 tensors s, a, s2 (next state) and episode, t, each (M,), M = transitions;
    transition t of episode e sits at index t * episodes + e (for hindsight goals).
    """
    nxt, opt = env.transitions(), env.optimal_actions()
    n, e = len(nxt), args.episodes
    half = 2 * env.cells[:, 1] >= env.width  # (N,) the right half, for --data split
    state, target = rng.integers(n, size=e), rng.integers(n, size=e)
    steps = []
    for t in range(args.episode_len):  # vectorized over episodes
        expert = opt[state, target]  # (E, 4): optimal actions, all False at the target
        greedy = np.argmax(expert + rng.random((e, 4)), axis=1)  # a random optimal one
        uniform = rng.integers(4, size=e)
        act = np.where((rng.random(e) < args.epsilon) | ~expert.any(1), uniform, greedy)
        moved = act
        if args.slip:  # (no draws without slip: the data of --slip 0 is unchanged by it)
            other = (act + 1 + rng.integers(3, size=e)) % 4  # one of the other three
            moved = np.where(rng.random(e) < args.slip, other, act)
        after = nxt[state, moved]
        if args.data == "split":
            after = np.where(half[after] == half[state], after, state)
        steps.append((state, act, after, np.arange(e), np.full(e, t)))
        state = after
        target = np.where(state == target, rng.integers(n, size=e), target)
    columns = [np.concatenate(c) for c in zip(*steps)]
    return dict(zip(("s", "a", "s2", "episode", "t"), map(torch.as_tensor, columns)))


def coverage(env, data):
    """Share of free cells and of (cell, action) pairs that the data contains."""
    n = len(env.cells)
    cells = torch.unique(torch.cat([data["s"], data["s2"]])).numel() / n
    edges = torch.unique(data["s"] * 4 + data["a"]).numel() / (4 * n)
    return {"transitions": len(data["s"]), "cell_coverage": cells, "edge_coverage": edges}


def cell_features(env, kind):
    """(N, F) features of every cell: one-hot (F = N) or (row, col) scaled to [-1, 1].

    With xy, phi and pi must change sharply at each wall (measured in the README: the
    critic learns as well, the actor reaches success 0.28 instead of 0.90 on maze)."""
    if kind == "onehot":
        return torch.eye(len(env.cells))
    size = torch.tensor([env.height - 1, env.width - 1], dtype=torch.float32)
    return 2 * torch.tensor(env.cells, dtype=torch.float32) / size.clamp(min=1) - 1


def mlp(inputs, hidden, outputs):
    """Two hidden ReLU layers. The authors use residual blocks of width 64 for phi (k = 128)
    and width 32 for pi; here the actor must hold a policy for all N^2 (s, g) pairs."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


class PairNet(nn.Module):
    """The same MLP on the concatenated features [x_s, x_g] of a (state, goal) pair: the
    actor pi(a | s, g) (4 logits), and td's value V(s, g) (1 output).

    Its first layer is W [x_s; x_g] + b = W_s x_s + W_g x_g + b, so, like phi, it runs once
    per cell and a batch of pairs gathers rows: the same function, without B x 2F inputs.
    """

    def __init__(self, features, hidden, outputs=4):
        super().__init__()
        self.s_in = nn.Linear(features, hidden)  # W_s, b
        self.g_in = nn.Linear(features, hidden, bias=False)  # W_g
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, outputs))

    def forward(self, x, s, g):
        """x (N, F) features of all cells; s, g (B,) cell indices -> (B, outputs)."""
        # index_select, not [s]: the same rows, with a faster backward on CPU
        return self.body(self.s_in(x).index_select(0, s) + self.g_in(x).index_select(0, g))


def build(env, args, device):
    """Features and fresh networks: the actor pi: (s, g) -> 4 logits and the critic,
    phi: F -> k for metricrl, V: (s, g) -> 1 for td, None for gcbc."""
    x = cell_features(env, args.features).to(device)
    f, h = x.shape[1], args.hidden
    critic = {"metricrl": lambda: mlp(f, h, args.latent).to(device),
              "td": lambda: PairNet(f, h, 1).to(device), "gcbc": lambda: None}[args.algo]()
    return x, critic, PairNet(f, h).to(device)


# =========================================================== 2. critic (paper Sec. 3)
def push(d, shape, eps=1e-6):
    """The negative term on pairs at latent distance d, any shape. The paper's -log d
    pushes with force 1/d: strong up close, weak far away, never zero. inverse, 1/d, has
    force 1/d^2: it spreads neighbours and leaves far pairs alone. raw, -d, pushes all
    pairs alike (the log transform dropped)."""
    if shape == "log":
        return -torch.log(d + eps)
    return 1 / (d + eps) if shape == "inverse" else -d


def critic_loss(z, z2, s, s2, lam, shape="log", metric="euclidean"):
    """The paper's contrastive metric loss on one batch of transitions.

    z, z2: (B, k) embeddings phi(s_i), phi(s'_i); s, s2: (B,) their cell indices.
      positive = mean_i (||phi(s'_i) - phi(s_i)|| - 1)^2      over transitions that moved
      negative = mean_{i != j} -log(||phi(s_i) - phi(s'_j)|| + eps)   over different cells
    (-log is --negative log, the paper's; see push() for the other shapes.)
    The positive distance is row-wise, (B, k), (B, k) -> (B,). The authors' code calls
    torch.cdist on (B, 1, k) and (B, k), which broadcasts to all B x B pairs; the paper
    means row-wise.
    A wall bump (s' = s) has true distance 0 and is never pulled to 1. Pairs of the same
    cell are left out of the push: their distance is 0 by construction.
    """
    moved = (s != s2).float()  # (B,)
    d_pos = latent_distance(z, z2, metric)  # (B,) from s_i to s'_i
    positive = (moved * (d_pos - 1) ** 2).sum() / moved.sum().clamp(min=1)
    d_all = pairwise(z, z2, metric)  # (B, B): d(phi(s_i), phi(s'_j))
    eye = torch.eye(len(s), dtype=torch.bool, device=s.device)
    other = ((s[:, None] != s2[None, :]) & ~eye).float()  # (B, B): i != j, different cells
    negative = (other * push(d_all, shape)).sum() / other.sum().clamp(min=1)
    return positive + lam * negative, {"positive": positive, "negative": negative}


def transition_counts(data, n):
    """How often each cell is a start s, a next state s', and each move u -> v: for
    dataset_critic_loss. Returns c (N,), c2 (N,), e (N, N) as floats."""
    c, c2 = (torch.bincount(data[k], minlength=n).float() for k in ("s", "s2"))
    e = torch.bincount(data["s"] * n + data["s2"], minlength=n * n).float().view(n, n)
    return c, c2, e


def dataset_critic_loss(z, counts, lam, shape="log", metric="euclidean"):
    """critic_loss with the whole dataset as one batch (--batch-size 0), summed per pair
    of cells (u, v) instead of per pair of transitions: M^2 pairs become N^2.

    z: (N, k) embeddings of all cells; counts: c, c2, e from transition_counts.
      positive: e[u, v] transitions u -> v, u != v, each (||z_u - z_v|| - 1)^2
      negative: c[u] c2[v] - e[u, v] pairs i != j with s_i = u, s'_j = v, u != v
    """
    c, c2, e = counts
    d = pairwise(z, z, metric)  # (N, N), from row to column
    other = 1 - torch.eye(len(z), dtype=z.dtype, device=z.device)  # u != v
    moved = e * other
    positive = (moved * (d - 1) ** 2).sum() / moved.sum().clamp(min=1)
    pairs = (c[:, None] * c2[None, :] - e) * other
    negative = (pairs * push(d, shape)).sum() / pairs.sum().clamp(min=1)
    return positive + lam * negative, {"positive": positive, "negative": negative}


def constrained_loss(z, counts, mu, metric):
    """--objective constrained (QRL's argument, Wang et al. 2023): push every pair apart,
    subject to d_phi(s -> s') <= 1 on every transition of the data:

      loss = -mean_{u != v} d(u -> v) + mu * mean_{moves u -> v} relu(d(u -> v) - 1)^2
    (the pairs weighted as the data holds them, c[u] c2[v], like dataset_critic_loss's push)

    With the constraints met, the triangle inequality gives d(u -> v) <= d_S(u, v) along
    any path of the data, and the push lifts every pair to that bound: the optimum is the
    shortest-path distance itself, which a quasimetric can hold exactly. mu, a Lagrange
    multiplier, rises while the constraints are broken (critic_step). z (N, k).
    """
    c, c2, e = counts
    d = pairwise(z, z, metric)  # (N, N)
    other = 1 - torch.eye(len(z), dtype=z.dtype, device=z.device)
    moved, pairs = e * other, c[:, None] * c2[None, :] * other
    violation = (moved * (d - 1).relu() ** 2).sum() / moved.sum().clamp(min=1)
    push = (pairs * d).sum() / pairs.sum().clamp(min=1)
    return -push + mu * violation, {"push": push, "violation": violation}


def with_super_state(data, args, n):
    """--super-state, the paper's fix for disconnected data (Sec. 3.4): one virtual state,
    index n, with all-zero features (the authors join the last frame of each trajectory
    to an all-zero observation), and a move to it from the last state of every
    trajectory, so the data's components meet there. For the critic only: no action
    leads there. Returns s, a, s2, each (M + E,)."""
    last = data["s2"][-args.episodes:]  # (E,) the last block of the data is t = T - 1
    return {"s": torch.cat([data["s"], last]), "a": torch.cat([data["a"], 0 * last]),
            "s2": torch.cat([data["s2"], torch.full_like(last, n)])}


def embed(critic, x, args):
    """phi of every cell, (N, k); with --super-state one more row, the virtual state."""
    return critic(torch.cat([x, x.new_zeros(1, x.shape[1])]) if args.super_state else x)


# ======================================= 3. value (Sec. 3.1) and advantage (Sec. 3.3)
def latent_distance(z, zg, metric="euclidean"):
    """d_phi(s, g) from s to g, row-wise: (..., k), (..., k) -> (...).

    euclidean: ||phi(s) - phi(g)||, the paper's: symmetric, so it cannot hold one-way
    moves. quasimetric (a metric residual network head, Liu et al. 2023): the first k/2
    coordinates give a Euclidean part, the others max_i relu(phi_i(s) - phi_i(g)). Both
    parts are 0 from s to s, never negative and obey the triangle inequality, and the
    second differs from s to g and from g to s.
    """
    if metric == "euclidean":
        return (z - zg).norm(dim=-1)
    h = z.shape[-1] // 2
    return (z[..., :h] - zg[..., :h]).norm(dim=-1) + (z[..., h:] - zg[..., h:]).relu().amax(-1)


def pairwise(z, z2, metric="euclidean"):
    """All pairs: (N, k), (M, k) -> (N, M), [i, j] = d_phi from z_i to z2_j."""
    if metric == "euclidean":
        return torch.cdist(z, z2)
    return latent_distance(z[:, None], z2[None], metric)


def value(d, gamma):
    """V(s, g) = gamma^{d_phi(s, g)} * r_g with r_g = 1 (Sec. 3.1)."""
    return gamma ** d


def advantage_weights(d, d2, args):
    """Weights of the imitation loss from d = d_phi(s, g), d2 = d_phi(s', g), each (B,).

    A = d - d2 is the progress towards g in steps, log_gamma(V(s, g) / V(s', g)), so it
    does not shrink with gamma^d far from the goal. exp: w = min(exp(beta A), w_max),
    clipped so that one outlier cannot dominate a batch. linear: the authors' code,
    w = V(s') - V(s) with V = -d, which is the same A, unclipped and possibly negative.
    """
    adv = d - d2  # (B,)
    if args.weighting == "linear":
        return adv
    return torch.exp(args.beta * adv).clamp(max=args.w_max)


# ================================================================ 4. actor (Sec. 3.3)
def actor_loss(logits, a, w):
    """Advantage-weighted imitation: -mean_i w_i log pi(a_i | s_i, g_i); w has no gradient."""
    logp = F.log_softmax(logits, dim=-1).gather(1, a[:, None]).squeeze(1)  # (B,)
    return -(w * logp).mean()


def sample(data, n, goals, args):
    """n transitions drawn uniformly, each with a goal: s, a, s2, g, each (n,). goals:
      random     any dataset state (MetricRL: its distances hold for every pair)
      hindsight  s'_t' of the same trajectory, t' >= t: the move is then a step of a path
                 that did reach g (GCBC's relabelling)
      mixed      half each (td's: hindsight goals carry the reward, random ones far pairs)
      None       no goal (g is None): the critic's batch of transitions
    """
    m, dev = len(data["s"]), data["s"].device
    i = torch.randint(m, (n,), device=dev)
    s, a, s2, g = data["s"][i], data["a"][i], data["s2"][i], None
    if goals == "random":
        g = data["s"][torch.randint(m, (n,), device=dev)]
    elif goals in ("hindsight", "mixed"):
        t = data["t"][i]
        later = t + (torch.rand(n, device=dev) * (args.episode_len - t)).long()  # [t, T)
        g = data["s2"][later * args.episodes + data["episode"][i]]  # (e, t') is at t' E + e
        if goals == "mixed":
            other = data["s"][torch.randint(m, (n,), device=dev)]
            g = torch.where(torch.rand(n, device=dev) < 0.5, g, other)
    return s, a, s2, g


# =========================== 5. the baselines: the same data and actor, other critics
# gcbc has no critic: every weight is 1, and its goals are hindsight goals (see sample).
TARGET_RATE = 0.5  # td: V_target moves this share of the way to V after each step (tuned)
DUAL_RATE = 10.0  # --objective constrained: mu grows by this times the mean violation


def td_loss(v, v_target, x, s, s2, g, args):
    """The critic that MetricRL replaces: V(s, g) learned by temporal differences.

      y    = gamma * (1 if s' = g else V_target(s', g))       so V* = gamma^d, as in MetricRL
      loss = mean |tau - 1(y < V(s, g))| (y - V(s, g))^2       expectile regression (IQL)
    tau = --expectile > 0.5 leans towards the best move in the data rather than the
    behaviour's average one. s, s2, g: (B,); pairs with s = g are left out (V(g, g) = 1).
    """
    with torch.no_grad():
        y = args.gamma * torch.where(s2 == g, 1.0, v_target(x, s2, g)[:, 0])  # (B,)
    u = y - v(x, s, g)[:, 0]  # (B,)
    keep = (s != g).float()
    tau = torch.where(u < 0, 1 - args.expectile, args.expectile)
    return (keep * tau * u ** 2).sum() / keep.sum().clamp(min=1)


def td_distance(v, x, s, g, gamma):
    """td's value as a distance, log_gamma V(s, g): (B,), so the same advantage applies."""
    return value_to_distance(v(x, s, g)[:, 0], gamma)


def value_to_distance(v, gamma):
    """log_gamma V, the inverse of value(): V (...) -> steps (...), V clamped to (0, 1]."""
    return torch.log(v.clamp(1e-6, 1)) / math.log(gamma)


# ========================================================== 6. training (Algorithm 1)
def critic_step(critic, x, data, counts, args, memory):
    """One step of the method's critic: (loss, info, dist), with dist(s, g) -> (B,) its
    distances for the actor's weights (None for gcbc, which has no critic). memory holds
    what a critic keeps from step to step: td's V_target, the constrained objective's mu.
    data: the critic's transitions (with the super-state's, see with_super_state)."""
    if args.algo == "gcbc":
        return torch.zeros((), device=x.device), {}, None
    if args.algo == "td":
        s, _, s2, g = sample(data, args.actor_batch, "mixed", args)  # (B_actor,)
        loss = td_loss(critic, memory["target"], x, s, s2, g, args)
        info = {"td_loss": loss, "critic_loss": loss}
        return loss, info, lambda s, g: td_distance(critic, x, s, g, args.gamma)
    z = embed(critic, x, args)  # (N, k): every cell once; a batch gathers rows
    if args.objective == "constrained":
        loss, info = constrained_loss(z, counts, memory["mu"], args.metric)
        memory["mu"] = (memory["mu"] + DUAL_RATE * info["violation"].detach()).clamp(max=1e4)
    elif args.batch_size > 0:
        s, _, s2, _ = sample(data, args.batch_size, None, args)  # (B,)
        loss, info = critic_loss(z[s], z[s2], s, s2, args.lam, args.negative, args.metric)
    else:  # the whole dataset as one batch
        loss, info = dataset_critic_loss(z, counts, args.lam, args.negative, args.metric)
    zd = z.detach()
    return loss, {**info, "critic_loss": loss}, lambda s, g: latent_distance(
        zd[s], zd[g], args.metric)


def train(env, data, x, critic, actor, args, evaluate_fn, log):
    """Critic alone for the first `critic_only` share of the steps, then both (gcbc:
    the actor from the start).

    phi runs on every cell once a step, z = phi(x) (N, k), and a batch gathers its rows:
    the same numbers and gradients as phi on the batch, cheaper. MetricRL's actor takes
    dataset states drawn uniformly as goals (not the one the data was collected for:
    random data has none; the critic's distances hold for every pair); --goals changes
    that, and gcbc takes hindsight goals (see sample). The two losses share one
    backward pass: the weights w carry no gradient, so the actor's loss does not move the
    critic. The actor's learning rate falls linearly to 0 over its steps, so the last
    policy is not a noisy iterate.
    """
    critic_params = list(critic.parameters()) if critic is not None else []
    opt = torch.optim.Adam([{"params": critic_params}, {"params": actor.parameters()}],
                           lr=args.lr, fused=True)
    actor_from = 0 if args.algo == "gcbc" else int(args.critic_only * args.steps)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, [  # per group: critic, actor
        lambda k: 1.0, lambda k: min(1.0, (args.steps - k) / max(1, args.steps - actor_from))])
    memory = {"target": copy.deepcopy(critic) if args.algo == "td" else None,  # td's V_target
              "mu": torch.ones((), device=x.device)}  # the constrained objective's multiplier
    goals = args.goals if args.goals != "auto" else "hindsight" if args.algo == "gcbc" else "random"
    cdata = with_super_state(data, args, len(x)) if args.super_state else data
    cells = len(x) + (1 if args.super_state else 0)  # the super-state is one more "cell"
    counts = transition_counts(cdata, cells)  # for --batch-size 0
    sums, n_sums, tick, last = {}, {}, time.time(), 0
    for step in range(1, args.steps + 1):
        loss, info, dist = critic_step(critic, x, cdata, counts, args, memory)
        if step > actor_from:
            s, a, s2, g = sample(data, args.actor_batch, goals, args)  # (B_actor,)
            with torch.no_grad():
                w = advantage_weights(dist(s, g), dist(s2, g), args) if dist else torch.ones(
                    len(s), device=x.device)
            info["actor_loss"] = actor_loss(actor(x, s, g), a, w)
            loss = loss + info["actor_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        if memory["target"] is not None:
            with torch.no_grad():
                for p_target, p in zip(memory["target"].parameters(), critic.parameters()):
                    p_target.lerp_(p, TARGET_RATE)
        for k, v in info.items():  # summed on the device: no host sync per step
            sums[k], n_sums[k] = sums.get(k, 0) + v.detach(), n_sums.get(k, 0) + 1
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, **{k: v.item() / n_sums[k] for k, v in sums.items()},
                   "steps_per_s": (step - last) / (time.time() - tick)}
            log({**row, **evaluate_fn()})
            sums, n_sums, tick, last = {}, {}, time.time(), step


# ========================================================= 7. evaluation (exact, BFS)
METRICS = ("success_rate", "path_ratio", "optimal_action_rate", "value_greedy_rate",
           "critic_success_rate", "spearman", "monotonicity")


def ground_truth(env, device):
    """The BFS truth as tensors: nxt (N, 4), d (N, N), opt (N, N, 4)."""
    return {"nxt": torch.as_tensor(np.array(env.transitions()), device=device),
            "d": torch.as_tensor(np.array(env.distance_matrix()), device=device).long(),
            "opt": torch.as_tensor(np.array(env.optimal_actions()), device=device)}


@torch.no_grad()
def pair_table(net, x, chunk=1 << 16):
    """A PairNet on every pair (s, g): (N, N, outputs), in chunks of pairs."""
    n = len(x)
    pairs = torch.arange(n * n, device=x.device)
    return torch.cat([net(x, p // n, p % n) for p in pairs.split(chunk)]).view(n, n, -1)


def policy_table(actor, x):
    """Greedy actions argmax_a pi(a | s, g) for every pair: (N, N)."""
    return pair_table(actor, x).argmax(-1)


@torch.no_grad()
def critic_distances(critic, x, args):
    """The critic's distance between all cells, (N, N): ||phi(s) - phi(g)|| for metricrl,
    log_gamma V(s, g) for td; None for gcbc."""
    if args.algo == "metricrl":
        z = embed(critic, x, args)[:len(x)]  # (N, k), without the super-state
        return pairwise(z, z, args.metric)
    if args.algo == "td":
        return value_to_distance(pair_table(critic, x)[..., 0], args.gamma)


def critic_table(dz, nxt):
    """The critic's own greedy policy: argmin_a d_phi(next(s, a), g). dz (N, N) -> (N, N)."""
    return dz[nxt].argmin(dim=1)  # dz[nxt]: (N, 4, N)


def rollout(table, nxt, limit, goals=None, slip=0.0, seed=0):
    """Roll every (s, g) out with the action table (N, N) by look-ups, all pairs at once.

    A greedy table is deterministic, so a pair that comes back to a cell it has visited
    is in a loop and never arrives. Brent's check finds that cheaply: each pair compares
    its cell with the one it saved at step 1, 2, 4, 8, ..., and a pair in a loop meets its
    saved cell within about twice the loop's length; it stops there, failed. Only pairs
    still on their way are moved, so the few long paths cost little. `goals` (a list of
    cell indices) rolls out only the pairs towards those goals. With slip > 0 each move
    goes in one of the other three directions with that probability (seeded draws; no
    loop check, a slipping pair may still get out of a loop).
    Returns reached (N, N) bool, steps taken (N, N).
    """
    gen = torch.Generator(device=table.device).manual_seed(seed)
    n = len(table)
    pair = torch.arange(n * n, device=table.device)
    pos, goal = pair // n, pair % n  # (P,) flat pairs, P = N^2
    steps = torch.zeros(n * n, dtype=torch.long, device=table.device)
    saved = pos.clone()
    wanted = torch.ones_like(pos, dtype=torch.bool) if goals is None else torch.isin(
        goal, torch.as_tensor(goals, device=table.device))
    live = pair[(pos != goal) & wanted]  # (L,) pairs on their way
    for t in range(1, limit + 1):
        if len(live) == 0:
            break
        act = table[pos[live], goal[live]]  # (L,)
        if slip:
            other = (act + 1 + torch.randint(3, act.shape, generator=gen, device=act.device)) % 4
            act = torch.where(torch.rand(act.shape, generator=gen, device=act.device) < slip,
                              other, act)
        pos[live] = nxt[pos[live], act]
        steps[live] += 1
        live = live[(pos[live] != goal[live]) & ((pos[live] != saved[live]) | (slip > 0))]
        if t & (t - 1) == 0:  # t is a power of two
            saved[live] = pos[live]
    return (pos == goal).view(n, n), steps.view(n, n)


def ranks(x):
    """Ranks of a 1-D tensor, ties sharing their average rank (for Spearman)."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    average = torch.cumsum(counts, 0) - (counts - 1) / 2  # average rank of each value
    return average[inverse].double()


def spearman(x, y):
    """Spearman rank correlation: Pearson correlation of the ranks."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return ((rx * ry).sum() / (rx.norm() * ry.norm())).item()


def monotonicity(dz, d, triplets=200_000, seed=0):
    """Sec. 3.1: share of triplets (s1, s2, g) with d(s1, g) < d(s2, g) whose order d_phi
    keeps, over `triplets` seeded draws (pairs with equal or no true distance dropped)."""
    gen = torch.Generator().manual_seed(seed)
    s1, s2, g = torch.randint(len(d), (3, triplets), generator=gen).to(d.device)
    d1, d2 = d[s1, g], d[s2, g]
    keep = (d1 >= 0) & (d2 >= 0) & (d1 != d2)
    near, far = torch.where(d1 < d2, s1, s2)[keep], torch.where(d1 < d2, s2, s1)[keep]
    return (dz[near, g[keep]] < dz[far, g[keep]]).double().mean().item()


@torch.no_grad()
def evaluate(dz, actor, x, truth, limit, slip=0.0):
    """All metrics against the BFS truth, over every ordered reachable pair (s, g), s != g
    (monotonicity over a fixed sample of triplets). The critic's are nan without a critic.
    With slip > 0, the actor's and the critic's success and the path ratio come from
    seeded rollouts that slip; the rest compares the tables with the deterministic truth.

    dz: (N, N) the critic's distances (critic_distances) or None; truth: dict of tensors
    nxt (N, 4), d (N, N) BFS distances, opt (N, N, 4).
    """
    nxt, d, opt = truth["nxt"], truth["d"], truth["opt"]
    pairs = d > 0  # (N, N) reachable, s != g
    pi = policy_table(actor, x)
    reached, steps = rollout(pi, nxt, limit, slip=slip)
    ok = reached & pairs
    rate = lambda table: (  # noqa: E731  (share of pairs whose action lies on a shortest path)
        opt.gather(2, table[..., None])[..., 0][pairs].double().mean().item())
    metrics = {
        "success_rate": ok[pairs].double().mean().item(),
        "path_ratio": (steps[ok] / d[ok]).mean().item() if ok.any() else float("nan"),
        "optimal_action_rate": rate(pi),
    }
    if dz is None:
        return {**metrics, **{k: float("nan") for k in METRICS[3:]}}
    greedy = critic_table(dz, nxt)
    shorter = pairs & pairs.T & (d < d.T)  # (N, N) one way is shorter than the other
    if shorter.any():  # one-way cells: does the critic know which way is shorter?
        margin = (dz.T - dz)[shorter]  # > 0 where the critic scores the shorter way shorter
        metrics["one_way_order"] = (margin > 1e-4).double().mean().item()  # (not rounding)
    return {**metrics, "value_greedy_rate": rate(greedy),
            "critic_success_rate": rollout(greedy, nxt, limit, slip=slip)[0][pairs]
            .double().mean().item(),
            "spearman": spearman(dz[pairs], d[pairs].double()),
            "monotonicity": monotonicity(dz, d)}


# =========================================================================== 8. plots
def grid_image(env, values):
    """Values per cell (N,) -> (H, W) array for imshow, walls masked."""
    image = np.full((env.height, env.width), np.nan)
    image[env.cells[:, 0], env.cells[:, 1]] = values
    return np.ma.masked_invalid(image)


def show_map(fig, ax, env, values, title, cmap="viridis", label="", **kw):
    cmap = plt.get_cmap(cmap).with_extremes(bad="0.25")  # walls dark grey
    im = ax.imshow(grid_image(env, values), cmap=cmap, **kw)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label=label)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def blank(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12)
    ax.set_axis_off()


def plot_distances(ax, d, dz, args):
    """The critic's against the true distance, over all reachable pairs."""
    if dz is None:
        return blank(ax, f"{args.algo} has no critic")
    pairs = d > 0
    true, learned = d[pairs], dz[pairs]
    dist = np.arange(1, true.max() + 1)  # every true distance
    q = np.array([np.percentile(learned[true == t], [10, 50, 90]) for t in dist])
    ax.fill_between(dist, q[:, 0], q[:, 2], alpha=0.3, label="10–90% of pairs")
    ax.plot(dist, q[:, 1], label="median")
    ax.plot(dist, dist, "k--", lw=1, label="learned = true")
    name = "d_φ(s, g)" if args.algo == "metricrl" else "log_γ V(s, g)"
    ax.set(title="Learned vs true distance, all pairs", xlabel="true distance d(s, g) (BFS)",
           ylabel=f"learned distance {name}")
    ax.legend()


def plot_embedding(fig, ax, env, z, goal, to_goal):
    """phi(s) of every cell (N, k) on its two principal axes, neighbours joined."""
    if z is None:
        return blank(ax, "no embedding φ")
    centred = z - z.mean(0)
    xy = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T  # (N, 2) PCA
    i, j = np.repeat(np.arange(len(env.cells)), 4), env.transitions().ravel()  # all moves
    edges = np.unique(np.sort(np.stack([i, j], 1)[i != j], 1), axis=0).T  # (2, E) pairs once
    ax.plot(xy[edges, 0], xy[edges, 1], color="0.8", lw=0.8, zorder=0)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=to_goal, cmap="viridis", s=18, plotnonfinite=True)
    ax.plot(*xy[goal], "*", color="white", ms=18, mec="k")
    fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.03, label="true distance to g")
    ax.set(title="φ(s) projected on 2 principal axes (lines: moves)", xlabel="PC 1",
           ylabel="PC 2")


def plot(path, env, args, x, critic, actor, data, truth, history, metrics):
    """One figure: value, policy and data on the map; distances, embedding, curves."""
    d = env.distance_matrix()
    goal = int(np.argmax(d.max(0)))  # the hardest goal: farthest from some cell
    dz = critic_distances(critic, x, args)  # (N, N) or None (gcbc)
    dz = None if dz is None else dz.cpu().numpy()
    with torch.no_grad():  # the policy towards this goal only: (N,) actions, then rollouts
        z = critic(x).cpu().numpy() if args.algo == "metricrl" else None  # (N, k)
        cells = torch.arange(len(x), device=x.device)
        table = torch.zeros(len(x), len(x), dtype=torch.long, device=x.device)
        table[:, goal] = actor(x, cells, torch.full_like(cells, goal)).argmax(-1)
        reached = rollout(table, truth["nxt"], len(x), goals=[goal])[0].cpu().numpy()
        pi = table.cpu().numpy()
    gr, gc = env.cells[goal]
    fig, axes = plt.subplots(2, 4, figsize=(20, 9.5))
    (a_v, a_true, a_pi, a_data), (a_d, a_pca, a_metrics, a_loss) = axes

    v_true = args.gamma ** d[:, goal].astype(float)
    low = v_true[d[:, goal] >= 0].min()
    if dz is None:
        blank(a_v, f"{args.algo} has no critic")
    else:
        v = value(dz[:, goal], args.gamma)
        low = min(low, v.min())  # one colour scale for both
        show_map(fig, a_v, env, v, r"Learned $V(s, g) = \gamma^{d_\phi(s, g)}$" if args.algo ==
                 "metricrl" else "Learned V(s, g), by TD", vmin=low, vmax=1, label="V")
    show_map(fig, a_true, env, np.where(d[:, goal] >= 0, v_true, np.nan),
             r"True optimal $V^*(s, g) = \gamma^{d(s, g)}$", vmin=low, vmax=1, label="V*")
    fails = ~reached[:, goal] & (d[:, goal] > 0)
    to_goal = np.where(d[:, goal] >= 0, d[:, goal], np.nan)  # (N,) unreachable cells blank
    show_map(fig, a_pi, env, to_goal, f"Greedy π(·|s, g): {fails.sum()} of "
             f"{(d[:, goal] > 0).sum()} cells fail (×)" + (", without slips" if args.slip else ""),
             cmap="Blues_r", label="true distance to g")
    move = gridworld.MOVES[pi[:, goal]]  # (N, 2) (d_row, d_col) of each cell's action
    small = 15 / max(env.height, env.width, 15)  # marks shrink on large maps
    a_pi.quiver(env.cells[:, 1], env.cells[:, 0], move[:, 1], move[:, 0], angles="xy",
                scale_units="xy", scale=1.6, width=0.006 * small, color="k")
    a_pi.plot(env.cells[fails, 1], env.cells[fails, 0], "x", color="red", ms=9 * small,
              mew=2 * small)
    visits = np.bincount(data["s"].cpu().numpy(), minlength=len(env.cells))
    show_map(fig, a_data, env, visits, f"Offline data: visits per cell (ε = {args.epsilon})",
             cmap="magma", label="visits")
    one_way = np.argwhere(np.isin(env.grid, list(gridworld.ONE_WAY)))  # (K, 2) doors
    for ax in (a_v, a_true, a_pi, a_data)[dz is None:]:
        ax.plot(gc, gr, "*", color="white", ms=18, mec="k", label="goal g")
        for r, c in one_way:  # one-way cells: their arrow
            ax.text(c, r, env.grid[r, c], ha="center", va="center", color="red", weight="bold")
    a_true.legend(loc="lower right", fontsize=8)
    plot_distances(a_d, d, dz, args)
    plot_embedding(fig, a_pca, env, z, goal, to_goal)

    logged = [h["step"] for h in history]
    keys = ("success_rate", "optimal_action_rate") if dz is None else (
        "success_rate", "critic_success_rate", "optimal_action_rate", "monotonicity")
    for key in keys:
        a_metrics.plot(logged, [h[key] for h in history], marker="o", ms=3, label=key)
    if args.algo != "gcbc":
        a_metrics.axvline(args.critic_only * args.steps, color="0.5", ls=":", label="actor starts")
    a_metrics.set(title="Exact metrics during training", xlabel="gradient step", ylim=(0, 1.02))
    a_metrics.legend(fontsize=8)
    a_actor = a_loss.twinx()  # the actor's loss on its own scale, at the right
    for ax, key, label, color in ((a_loss, "positive", "critic: positive term", "C0"),
                                  (a_loss, "negative", "critic: negative term", "C1"),
                                  (a_loss, "td_loss", "critic: TD loss", "C0"),
                                  (a_loss, "push", "critic: push, mean d", "C0"),
                                  (a_loss, "violation", "critic: violation of d(s,s') ≤ 1", "C1"),
                                  (a_actor, "actor_loss", "actor: weighted NLL (right axis)", "C2")):
        rows = [h for h in history if key in h]
        if rows:
            ax.plot([h["step"] for h in rows], [h[key] for h in rows], marker="o", ms=3,
                    color=color, label=label)
    a_loss.set(title="Losses (mean since the last point)", xlabel="gradient step",
               ylabel="critic loss terms" if dz is not None else "")
    if dz is None:
        a_loss.set_yticks([])
    a_actor.set_ylabel("actor loss")
    (h1, l1), (h2, l2) = a_loss.get_legend_handles_labels(), a_actor.get_legend_handles_labels()
    a_actor.legend(h1 + h2, l1 + l2, fontsize=8, loc="center right")
    critic = "" if dz is None else (f", critic success {metrics['critic_success_rate']:.3f}, "
                                    f"monotonicity {metrics['monotonicity']:.3f}")
    fig.suptitle(f"{method(args)} on '{args.env}' ({len(env.cells)} cells, {args.episodes}×"
                 f"{args.episode_len} steps of data, ε = {args.epsilon}). Over all pairs: success "
                 f"{metrics['success_rate']:.3f}{critic}. Top row: one far goal g = ({gr}, {gc})",
                 fontsize=13)
    fig.subplots_adjust(left=0.035, right=0.965, bottom=0.07, top=0.92, wspace=0.32, hspace=0.22)
    fig.savefig(path, dpi=70)  # (fixed margins: tight_layout would draw the figure twice)
    plt.close(fig)


# =================================================================== 9. save and load
def save_checkpoint(path, env, args, critic, actor, history):
    torch.save({"critic": critic.state_dict() if critic else None, "actor": actor.state_dict(),
                "args": dataclasses.asdict(args), "layout": env.layout, "history": history}, path)


class Agent:
    """A trained policy: act(states, goals) with (B, 2) int arrays of (row, col)."""

    def __init__(self, env, args, x, critic, actor):
        self.env, self.args, self.x, self.critic, self.actor = env, args, x, critic, actor

    @torch.no_grad()
    def act(self, states, goals):
        """-> (B,) int array of greedy actions argmax_a pi(a | s, g)."""
        s, g = (torch.as_tensor(self.cell_indices(c), device=self.x.device) for c in (states, goals))
        return self.actor(self.x, s, g).argmax(-1).cpu().numpy()

    def cell_indices(self, rc):
        rc = np.asarray(rc).reshape(-1, 2)
        inside = ((rc >= 0) & (rc < (self.env.height, self.env.width))).all(1)
        index = np.full(len(rc), -1)
        index[inside] = self.env.index[rc[inside, 0], rc[inside, 1]]
        if (index < 0).any():
            raise ValueError(f"not a free cell of this map: {rc[index < 0][0].tolist()}")
        return index


def load_agent(path, device="cpu"):
    """Rebuild the environment and networks of a model.pt; returns an Agent."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    args = Args(**ckpt["args"])
    env = gridworld.GridWorld(ckpt["layout"])
    x, critic, actor = build(env, args, device)
    for net, state in ((critic, ckpt["critic"]), (actor, ckpt["actor"])):
        if net is not None:
            net.load_state_dict(state)
            net.eval()
    agent = Agent(env, args, x, critic, actor)
    agent.history = ckpt["history"]
    return agent


# =========================================================================== 10. main
class UsageError(Exception):
    """Bad input from the command line: one line on stderr, exit code 2."""


def parse_args(argv=None):
    """argparse from the Args dataclass: one flag per field, its knob's text as help."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.error = lambda message: fail(message)  # one line, exit 2 (no usage dump)
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        shown = "" if f.default == "" or f.default is False else f" (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=f.type, default=f.default,
                                choices=f.metadata["choices"], help=f.metadata["help"] + shown)
    return Args(**vars(parser.parse_args(argv)))


def fail(message):
    print(f"metricrl.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args):
    """Raise UsageError for values the run cannot use."""
    rules = [  # (flags, test, what the flags must be)
        (("steps", "episode_len", "actor_batch", "eval_every", "hidden", "lr", "w_max"),
         lambda v: v > 0, "positive"),
        (("seed", "episodes", "batch_size", "lam", "beta"), lambda v: v >= 0, "0 or more"),
        (("latent",), lambda v: v >= 2, "2 or more (the figure projects phi on 2 axes)"),
        (("epsilon", "slip"), lambda v: 0 <= v <= 1, "in [0, 1]"),
        (("critic_only",), lambda v: 0 <= v < 1, "in [0, 1)"),
        (("gamma",), lambda v: 0 < v <= 1, "in (0, 1]"),
        (("expectile",), lambda v: 0 < v < 1, "in (0, 1)"),
        (("seeds",), lambda v: v > 0, "positive"),
    ]  # (the flags with a list of choices are checked by argparse)
    if args.algo == "td" and args.gamma == 1:
        raise UsageError("td (--algo td, or in --algos) needs --gamma below 1 (its distance is "
                         "log_gamma V)")
    if args.algo != "metricrl" and (args.super_state or args.objective != "paper" or
                                    args.metric != "euclidean"):
        raise UsageError("--super-state, --objective and --metric are MetricRL's: use --algo "
                         "metricrl")
    if args.objective == "constrained" and args.batch_size > 0:
        raise UsageError("--objective constrained uses the whole dataset: --batch-size 0")
    for names, ok, what in rules:
        for name in names:
            value = getattr(args, name)
            if not ok(value):  # nan fails every test
                raise UsageError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")


def resolve_device(name):
    """'auto' -> cuda if available, else cpu; UsageError if the device does not exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here "
                             f"(torch {torch.__version__}); use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type != "cpu":
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def method(args):
    """The method's name, as --algos spells it: metricrl, metricrl-linear, gcbc, td; then
    what differs from the paper's set-up: metricrl-inverse, metricrl-quasimetric, ..."""
    parts = [args.algo, "linear" if args.weighting == "linear" and args.algo != "gcbc" else "",
             args.negative if args.negative != "log" and args.algo == "metricrl" else "",
             "quasimetric" if args.metric == "quasimetric" else "",
             "constrained" if args.objective == "constrained" else "",
             "split" if args.data == "split" else "", "super" if args.super_state else "",
             f"slip{args.slip:g}" if args.slip else ""]
    return "-".join(p for p in parts if p)


def map_name(spec):
    """'maze' -> 'maze', 'maps/my_map.txt' -> 'my_map': for folder names."""
    return os.path.splitext(os.path.basename(spec))[0]


def output_dir(args):
    algo = method(args)
    if args.out:
        out = args.out
    elif args.load:
        out = os.path.dirname(args.load) or "."
    else:
        out = os.path.join("runs", f"{map_name(args.env)}-{algo}-s{args.seed}")
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, ".write-test"), "w"):
            pass
        os.remove(os.path.join(out, ".write-test"))
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror})") from None
    return out, algo


def report(row, args):
    """One progress line per evaluation."""
    if args.quiet:
        return
    critic = row.get("critic_loss", math.nan)
    losses = ("no critic     " if math.isnan(critic) else f"critic {critic:7.3f}" if
              abs(critic) >= 0.01 else f"critic {critic:7.1e}") + (
        f"  actor {row['actor_loss']:6.3f}" if "actor_loss" in row else " " * 14)
    scores = "" if math.isnan(row["critic_success_rate"]) else (
        f"  critic success {row['critic_success_rate']:.3f}  monotonicity "
        f"{row['monotonicity']:.3f}")
    print(f"step {row['step']:6d}/{args.steps}  {losses}  {row['steps_per_s']:5.0f} steps/s | "
          f"success {row['success_rate']:.3f}{scores}", flush=True)


def restore(args, device):
    """--load: the checkpoint's agent and its arguments (keeping this run's output flags)."""
    try:
        agent = load_agent(args.load, device)
    except Exception as e:  # missing, truncated or foreign file
        raise UsageError(f"--load {args.load}: not a metricrl checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return agent, dataclasses.replace(agent.args, load=args.load, out=args.out,
                                      device=args.device, quiet=args.quiet)


def make_env(spec):
    try:
        env = gridworld.GridWorld(spec)
    except ValueError as e:
        raise UsageError(str(e) if spec in str(e) else f"--env {spec}: {e}") from None
    if not (env.distance_matrix() > 0).any():
        raise UsageError(f"--env {spec}: no free cell can reach another one")
    return env


def write_log(path, history):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(dict.fromkeys(k for row in history for k in row)))
        writer.writeheader()
        writer.writerows(history)


def peak_memory(device):
    """Peak resident memory of this process (and peak GPU memory on CUDA), in MB of 2^20."""
    peak = {}
    try:
        import resource  # not on Windows
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        peak["peak_memory_mb"] = round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)
    except ImportError:
        pass
    if device.type == "cuda":
        peak["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def benchmark(args, device, out):
    """--bench: training steps/s (critic and actor, as train logs them) at three critic
    batch sizes, then evaluation pairs/s, on --device, written to bench.json. (Both end
    with .item() calls, which wait for the GPU: the clocks are honest on CUDA too.)"""
    env = make_env(args.env)
    args = size_to_map(args, env)
    data = {k: v.to(device) for k, v in
            collect_dataset(env, args, np.random.default_rng(args.seed)).items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": str(device), "device_name": name, "env": args.env,
              "cells": len(env.cells), "threads": torch.get_num_threads(), "train": []}
    for b in (0, 256, 1024):  # critic batch: the whole dataset (default), or B transitions
        x, critic, actor = build(env, args, device)
        rows = []
        for n in (10, min(args.steps, 300)):  # a warm-up, then the timed run
            timed = dataclasses.replace(args, batch_size=b, steps=n, critic_only=0.0, eval_every=n)
            train(env, data, x, critic, actor, timed, dict, rows.append)
        result["train"].append({"batch_size": b, "actor_batch": args.actor_batch,
                                "steps_per_s": round(rows[-1]["steps_per_s"], 1)})
        print(f"train, critic batch {b or 'all':>5} and actor batch {args.actor_batch}: "
              f"{rows[-1]['steps_per_s']:8.1f} steps/s on {name}", flush=True)
    t = time.time()
    evaluate(critic_distances(critic, x, args), actor, x, ground_truth(env, device),
             gymnasium.spec("GridWorld-v0").max_episode_steps)
    result["eval_pairs_per_s"] = round(len(env.cells) ** 2 / (time.time() - t))
    print(f"evaluate {len(env.cells) ** 2} pairs: {result['eval_pairs_per_s']:,} pairs/s")
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {os.path.join(out, 'bench.json')}")
    return result


def run(args, start, summary=True):
    """Data -> critic and actor -> exact metrics -> files. Returns metrics.json's dict."""
    check_args(args)
    device = resolve_device(args.device)
    if (args.compare or args.assumptions) and (args.bench or args.load):
        raise UsageError(f"--{'compare' if args.compare else 'assumptions'} trains its own runs: "
                         f"drop --bench and --load")
    if args.compare:
        return compare(args)
    if args.assumptions:
        return assumptions(args)
    flags = dataclasses.asdict(args)  # as given, for --compare's resume check
    if args.bench:
        return benchmark(args, device, output_dir(args)[0])
    agent, args = restore(args, device) if args.load else (None, args)
    env = agent.env if agent else make_env(args.env)
    args = size_to_map(args, env)
    out, algo = output_dir(args)
    limit = gymnasium.spec("GridWorld-v0").max_episode_steps
    torch.manual_seed(args.seed)
    data = {k: v.to(device) for k, v in
            collect_dataset(env, args, np.random.default_rng(args.seed)).items()}
    truth = ground_truth(env, device)
    if agent:  # re-evaluate a checkpoint
        x, critic, actor, history = agent.x, agent.critic, agent.actor, agent.history
        metrics = evaluate(critic_distances(critic, x, args), actor, x, truth, limit, args.slip)
    else:
        x, critic, actor = build(env, args, device)
        history = []
        if not args.quiet:
            print(f"{args.env}: {len(env.cells)} cells | data {coverage(env, data)} | "
                  f"device {device} | {args.steps} steps", flush=True)
        train(env, data, x, critic, actor, args,
              lambda: evaluate(critic_distances(critic, x, args), actor, x, truth, limit,
                               args.slip),
              lambda row: (history.append(row), report(row, args)))
        metrics = {k: v for k, v in history[-1].items()  # training ends with an evaluation
                   if k in METRICS or k == "one_way_order"}
        save_checkpoint(os.path.join(out, "model.pt"), env, args, critic, actor, history)
        write_log(os.path.join(out, "log.csv"), history)
    plot(os.path.join(out, "metricrl.png"), env, args, x, critic, actor, data, truth, history,
         metrics)
    metrics.update(env=args.env, algo=algo, seed=args.seed, device=str(device),
                   steps=args.steps, seconds=round(time.time() - start, 2),
                   dataset=coverage(env, data), **peak_memory(device),
                   flags=flags)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    files = "metrics.json, metricrl.png" + ("" if agent else ", log.csv, model.pt")
    if summary:
        print("\n".join([f"wrote {os.path.join(out, '')} ({files}) in {metrics['seconds']:.1f} s"]
                        + [f"  {k:20s} {metrics[k]:.3f}" for k in metrics
                           if k in METRICS or k == "one_way_order"]))
    return metrics


# =================================== 11. --compare: a grid of runs, a table, a figure
VARIANTS = {"metricrl": {"algo": "metricrl", "weighting": "exp"},  # the names in --algos
            "metricrl-linear": {"algo": "metricrl", "weighting": "linear"},
            "gcbc": {"algo": "gcbc", "weighting": "exp"}, "td": {"algo": "td", "weighting": "exp"}}
REPORTED = ("success_rate", "path_ratio", "optimal_action_rate", "critic_success_rate")
SWEEP_KNOBS = ("compare", "assumptions", "algos", "epsilons", "seeds", "envs", "negatives")


def grid(args):
    """The runs of --compare, one Args per (env, negative, algo, epsilon, seed); the push
    shape varies for metricrl only. Each run writes to <out>/<env>-<method>-e<eps>-s<seed>."""
    items = lambda flag: list(dict.fromkeys(  # noqa: E731  (in order, without repeats)
        v.strip() for v in getattr(args, flag).split(",") if v.strip()))
    envs, algos, negatives = items("envs") or [args.env], items("algos"), items("negatives")
    try:
        epsilons = list(dict.fromkeys(float(e) for e in items("epsilons")))
    except ValueError:
        epsilons = [math.nan]
    if not all(0 <= e <= 1 for e in epsilons):  # (nan fails too)
        raise UsageError(f"--epsilons must be numbers in [0, 1], got {args.epsilons!r}")
    for flag, values, known in (("algos", algos, VARIANTS), ("negatives", negatives, NEGATIVES),
                                ("epsilons", epsilons, None)):
        if not values:
            raise UsageError(f"--{flag} is empty")
        for value in set(values) - set(known or values):
            raise UsageError(f"--{flag}: unknown {value!r}; choose from {', '.join(known)}")
    for env in envs:
        make_env(env)  # a bad map fails now, not an hour into the sweep
    root = args.out or os.path.join("runs", "compare-" + "-".join(map(map_name, envs)))
    plain = {k: getattr(Args(), k) for k in SWEEP_KNOBS}  # a run is not a sweep
    runs = []
    for env, negative, algo, eps, seed in itertools.product(
            envs, negatives, algos, epsilons, range(args.seed, args.seed + args.seeds)):
        if negative != negatives[0] and VARIANTS[algo].get("algo", "metricrl") != "metricrl":
            continue
        cell = dataclasses.replace(args, **plain, **VARIANTS[algo], env=env, negative=negative,
                                   epsilon=eps, seed=seed, quiet=True)
        check_args(cell)
        runs.append(dataclasses.replace(cell, out=os.path.join(
            root, f"{map_name(env)}-{method(cell)}-e{eps:g}-s{seed}")))
    return root, runs


def finished(cell):
    """metrics.json of a run made with the same flags (device and output aside), or None."""
    try:
        with open(os.path.join(cell.out, "metrics.json")) as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return None
    same = lambda a: {k: v for k, v in a.items() if k not in ("out", "device")}  # noqa: E731
    saved = {**dataclasses.asdict(Args()), **metrics.get("flags", {})}  # new knobs: defaults
    return metrics if same(saved) == same(dataclasses.asdict(cell)) else None


def sweep(root, runs, name):
    """Run every run that has no metrics.json made with the same flags yet (so a sweep can
    be stopped and continued), a progress line each. Returns [(Args, metrics)]."""
    os.makedirs(root, exist_ok=True)
    todo = sum(finished(cell) is None for cell in runs)
    print(f"{name}: {len(runs)} runs in {root}, {len(runs) - todo} done before", flush=True)
    results, took = [], []
    for k, cell in enumerate(runs, 1):
        metrics = finished(cell)
        if metrics is None:
            tick = time.time()
            metrics = run(cell, tick, summary=False)
            took.append(time.time() - tick)
            todo -= 1
            left = f"about {todo * np.mean(took) / 60:.1f} min left"
        else:
            left = "done before"
        results.append((cell, metrics))
        critic = metrics["critic_success_rate"]
        critic = "  —  " if math.isnan(critic) else f"{critic:.3f}"
        print(f"[{k:3d}/{len(runs)}] {os.path.basename(cell.out):32s} success "
              f"{metrics['success_rate']:.3f}  critic success {critic}  "
              f"{metrics['seconds']:5.1f} s | {left}", flush=True)
    return results


def compare(args):
    """--compare: the grid's runs (see sweep), then compare.md and compare.png."""
    root, runs = grid(args)
    results = sweep(root, runs, "--compare")
    table = compare_table(results)
    with open(os.path.join(root, "compare.md"), "w") as f:
        f.write(table)
    compare_plot(os.path.join(root, "compare.png"), results)
    print(table + f"\nwrote {os.path.join(root, 'compare.md')} and compare.png "
          f"({sum(m['seconds'] for _, m in results) / 60:.1f} min of runs)")
    return results


def mean_std(values):
    """Mean and std over seeds, runs without the value (nan) left out."""
    v = np.array(values, dtype=float)
    v = v[~np.isnan(v)]
    return (v.mean(), v.std()) if len(v) else (np.nan, np.nan)


def cells(runs, keys):
    """Markdown cells "mean ± std" over the runs (metrics dicts) for each key; "—" where no
    run has the value, no ± for a single run."""
    stats = [mean_std([m.get(k, math.nan) for m in runs]) for k in keys]
    return " | ".join("—" if np.isnan(m) else f"{m:.3f}" + (f" ± {sd:.3f}" if len(runs) > 1
                                                             else "") for m, sd in stats)


def cell_key(cell):
    """What a row of the table is: (env, method, epsilon); seeds are averaged."""
    return map_name(cell.env), method(cell), cell.epsilon


def compare_table(results):
    """Markdown: mean ± std over seeds per (env, method, epsilon), in grid order."""
    rows = {}
    for cell, metrics in results:
        rows.setdefault(cell_key(cell), []).append(metrics)
    cell = results[0][0]
    lines = [f"Steps {cell.steps}, data {cell.episode_len}-step trajectories (sized to the map), "
             f"seeds {len(next(iter(rows.values())))}; {platform.machine()} CPU with "
             f"{os.cpu_count()} cores, torch {torch.__version__}, device {results[0][1]['device']}."
             " Mean ± std over seeds." if len(next(iter(rows.values()))) > 1 else "", "",
             "| env | method | ε | " + " | ".join(REPORTED) + " | seconds |",
             "|---|---|---|" + "---|" * (len(REPORTED) + 1)]
    for (env, name, eps), ms in rows.items():
        lines.append(f"| {env} | {name} | {eps:g} | {cells(ms, REPORTED)} | "
                     f"{np.mean([m['seconds'] for m in ms]):.1f} |")
    return "\n".join(lines) + "\n"


def compare_plot(path, results):
    """Success and the actor's optimal-action rate against epsilon, one line per method
    (the critic's own success dotted); grouped bars when several maps are compared."""
    stats = {}
    for cell, metrics in results:
        stats.setdefault(cell_key(cell), []).append(metrics)
    envs = list(dict.fromkeys(k[0] for k in stats))
    names = list(dict.fromkeys(k[1] for k in stats))
    epsilons = sorted({k[2] for k in stats})
    at = lambda key, metric: mean_std([m[metric] for m in stats[key]])  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
    if len(envs) == 1 and len(epsilons) > 1:  # the paper's data-quality figure
        drawn = []  # critics drawn (metricrl-linear trains metricrl's critic: draw it once)
        for ax, metric in zip(axes, ("success_rate", "optimal_action_rate")):
            for i, name in enumerate(names):
                m, sd = np.array([at((envs[0], name, e), metric) for e in epsilons]).T
                ax.errorbar(epsilons, m, sd, marker="o", capsize=3, color=f"C{i}", label=name)
                c = np.array([at((envs[0], name, e), "critic_success_rate")[0]
                              for e in epsilons])
                if metric == "success_rate" and not np.isnan(c).all() and not any(
                        np.allclose(c, other) for other in drawn):
                    drawn.append(c)
                    ax.plot(epsilons, c, ":", color=f"C{i}",
                            label=f"{name}: its critic's own greedy policy")
            ax.set(xlabel="ε of the behaviour policy (0 expert, 1 random)", ylabel=metric,
                   ylim=(-0.02, 1.02), title=f"{metric} on '{envs[0]}' (all pairs)")
    else:  # grouped bars: one group per (env, epsilon), one bar per method
        groups = [(env, e) for env in envs for e in epsilons if (env, names[0], e) in stats]
        width = 0.8 / len(names)
        for ax, metric in zip(axes, ("success_rate", "critic_success_rate")):
            for i, name in enumerate(names):
                m, sd = np.array([at((env, name, e), metric) if (env, name, e) in stats
                                  else (np.nan, np.nan) for env, e in groups]).T
                ax.bar(np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width, m, width,
                       yerr=sd, capsize=3, color=f"C{i}", label=name)
            ax.set_xticks(range(len(groups)), [env if len(epsilons) == 1 else f"{env}\nε = {e:g}"
                                                for env, e in groups])
            ax.set(ylabel=metric, ylim=(0, 1.05), title=f"{metric} (all pairs)")
    handles, labels = axes[0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: (  # each method, then its critic
        names.index(labels[i].split(":")[0]), ":" in labels[i]))
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="lower center",
               ncol=min(4, len(labels)), fontsize=9)
    seeds = len(next(iter(stats.values())))
    fig.suptitle(f"Same data, same actor network, same exact evaluation: only the method "
                 f"differs. Mean ± std over {seeds} seed(s); metricrl-linear trains "
                 f"metricrl's critic" if "metricrl-linear" in names else
                 f"Mean ± std over {seeds} seed(s), ε = {', '.join(f'{e:g}' for e in epsilons)}")
    fig.tight_layout(rect=(0, 0.04 + 0.04 * math.ceil(len(labels) / 4), 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ============================ 12. --assumptions: where MetricRL breaks, and what fixes it
CONSTRAINED = {"objective": "constrained", "metric": "quasimetric"}
ASSUMPTIONS = [  # (experiment, map, variant, flags)
    *[("invertible actions", env, name, flags) for env in ("oneway", "maze")
      for name, flags in (("euclidean", {}), ("quasimetric", {"metric": "quasimetric"}))],
    *[("deterministic moves", "maze", f"slip {p:g}", {"slip": p}) for p in (0, 0.1, 0.3)],
    ("connected data", "rooms", "all data", {}),
    ("connected data", "rooms", "split", {"data": "split"}),
    ("connected data", "rooms", "split + super-state", {"data": "split", "super_state": True}),
    *[("the objective", env, name, flags) for env in ("maze", "rooms", "oneway", "maze25")
      for name, flags in (("paper's loss", {}), ("constrained", CONSTRAINED))],
]
ASSUMED = ("success_rate", "path_ratio", "optimal_action_rate", "critic_success_rate",
           "value_greedy_rate", "spearman", "one_way_order")


def assumptions(args):
    """--assumptions: each experiment of ASSUMPTIONS for --seeds seeds (resumable, see
    sweep), then assumptions.md (mean ± std) and assumptions.png."""
    root, runs, keys = args.out or os.path.join("runs", "assumptions"), [], []
    default = Args()  # every variant starts from the paper's set-up (--steps etc. are kept)
    plain = {k: getattr(default, k) for k in (*SWEEP_KNOBS, "algo", "weighting", "negative",
                                             "metric", "objective", "slip", "data", "super_state")}
    for experiment, env, name, flags in ASSUMPTIONS:
        for seed in range(args.seed, args.seed + args.seeds):
            slug = "-".join([env, *(f"{k}-{v}" for k, v in flags.items()  # same flags, same run
                                    if v != getattr(default, k))])
            cell = dataclasses.replace(args, **{**plain, **flags}, env=env, seed=seed,
                                       quiet=True, out=os.path.join(root, f"{slug}-s{seed}"))
            check_args(cell)
            runs.append(cell)
            keys.append((experiment, env, name))
    rows = {}
    for key, (cell, metrics) in zip(keys, sweep(root, runs, "--assumptions")):
        rows.setdefault(key, []).append(metrics)
    lines = ["| experiment | map | variant | " + " | ".join(ASSUMED) + " |",
             "|---|---|---|" + "---|" * len(ASSUMED)]
    for (experiment, env, name), ms in rows.items():
        lines.append(f"| {experiment} | {env} | {name} | {cells(ms, ASSUMED)} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(root, "assumptions.md"), "w") as f:
        f.write(f"Steps {args.steps}, seeds {args.seeds}, mean ± std. constrained: "
                f"--objective constrained --metric quasimetric. one_way_order: share of the "
                f"pairs with a shorter way one way whose shorter way the critic scores "
                f"shorter.\n\n" + table)
    fig, axes = plt.subplots(2, 2, figsize=(16, 10))
    axes = axes.ravel()
    for ax, experiment in zip(axes, dict.fromkeys(k[0] for k in rows)):
        mine = [k for k in rows if k[0] == experiment]
        for i, metric in enumerate(("success_rate", "critic_success_rate")):
            m, sd = np.array([mean_std([r[metric] for r in rows[k]]) for k in mine]).T
            ax.bar(np.arange(len(mine)) + (i - 0.5) * 0.4, m, 0.4, yerr=sd, capsize=3,
                   color=f"C{i}", label="actor's success" if i == 0 else "critic's own success")
        ratio = [mean_std([r["path_ratio"] for r in rows[k]])[0] for k in mine]
        ax.set_xticks(range(len(mine)), [f"{env}\n{name}\npath × {p:.2f}"
                                         for (_, env, name), p in zip(mine, ratio)], fontsize=9)
        ax.set(title=experiment, ylim=(0, 1.05), ylabel="success over all pairs")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Where MetricRL's assumptions break (mean ± std over {args.seeds} seeds; "
                 f"path ×: steps taken / shortest, over the actor's successes; constrained: "
                 f"with the quasimetric)")
    fig.tight_layout()
    fig.savefig(os.path.join(root, "assumptions.png"), dpi=80)
    plt.close(fig)
    print(table + f"wrote {os.path.join(root, 'assumptions.md')} and assumptions.png")
    return rows


def main(argv=None, start=None):
    start = start or time.time()
    args = parse_args(argv)
    try:
        return run(args, start)
    except UsageError as e:
        fail(str(e))


if __name__ == "__main__":
    main(start=START)

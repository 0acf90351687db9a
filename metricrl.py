"""MetricRL (Reichlin et al., arXiv 2402.10820) on a gridworld, measured exactly against BFS.

    python metricrl.py --env maze [--device cuda]   # one run; --help lists every knob
    python experiments.py --compare --env maze      # the sweeps of docs/results.md
Read it beside the paper. Sections 1-7, the method in the paper's order: data, critic, value
and advantage, actor, baselines, training, exact evaluation; 8-10: one run, its figure, the
command line. A layer for phi: build_critic(); a map: gridworld.LAYOUTS, or a file for --env.
Shapes: N cells, A actions, M transitions, B batch, F features per cell, k latent size."""
import copy
import csv
import dataclasses
import json
import math
import os
import time
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

import gridworld
from cli import UsageError, exit_with_one_line, parse_args, require, say, staged


@dataclasses.dataclass
class Args:  # each knob's comment is its --help text
    env: str = "maze"  # open, rooms, maze, loops, oneway, doorkey, maze<N>, hypermaze<d>, a file
    algo: Literal["metricrl", "gcbc", "td"] = "metricrl"  # or a baseline: gcbc, td
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    seed: int = 0  # seeds the data and the networks (the evaluation is exact)
    episodes: int = 0  # offline trajectories; 0: 200 per 512 moves (cell, action) of the map
    episode_len: int = 100  # steps per trajectory
    epsilon: float = 1.0  # behaviour: random action with this probability, else an optimal one
    features: Literal["onehot", "xy", "image"] = "onehot"  # a cell: one-hot, coordinates, or RGB
    fourier: int = 4  # --features xy: L, sin and cos of the coordinates at L frequencies; 0: none
    tile: int = 2  # --features image: pixels a cell side (the paper's: 8, a GPU's work)
    channels: int = 16  # --features image: channels of each convolution (the paper's: 64)
    holdout: float = 0.0  # share of the cells that the data never visits (seeded; rest connected)
    slip: float = 0.0  # probability that a move slips to another direction (data, rollouts)
    data: Literal["all", "split", "one-direction"] = "all"  # split halves; one-direction: one way
    super_state: bool = False  # join every trajectory's end to one virtual state
    latent: int = 32  # k, the size of the embedding phi(s)
    hidden: int = 0  # width of the hidden layers of phi and pi; 0: 128, 256 beyond 8 actions
    critic: Literal["paper", "exact", "bfs"] = "paper"  # the paper's; exact: learns d; bfs: oracle
    lam: float = 1.0  # lambda, weight of the negative (push) term
    metric: Literal["euclidean", "quasimetric"] = "euclidean"  # d_phi; quasimetric: asymmetric
    gamma: float = 0.99  # td's discount; MetricRL's A = d - d' ignores it (the figure's V uses it)
    weighting: Literal["exp", "linear"] = "exp"  # linear: w = A (the authors' code)
    beta: float = 6.0  # inverse temperature of the exp weights
    w_max: float = 1000.0  # clip of the exp weights: at beta 6, it binds for A > 1.15 steps
    goals: Literal["auto", "uniform", "random", "hindsight"] = "auto"  # auto: hindsight for gcbc
    actions: Literal["auto", "one", "all"] = "auto"  # one per (s, g), or all at s (hypermaze.md)
    expectile: float = 0.7  # td: expectile of the TD target
    steps: int = 0  # gradient steps in all; 0: 2,600 (--critic exact: 16 per cell, at least that)
    critic_only: float = 0.2  # share of the steps that train the critic alone (not gcbc, bfs)
    actor_batch: int = 0  # (s, g) samples an actor step (and td's critic); 0: max(1024, N^2/32)
    lr: float = 3e-3  # Adam learning rate; the actor's falls linearly to lr / its steps
    eval_every: int = 0  # exact evaluation every this many steps; 0: 500, past 2,600 steps more
    out: str = ""  # output folder (default: runs/<map>-<algo>-<knobs changed>-s<seed>)
    quiet: bool = False  # print nothing (the files are written all the same)


# ============================================================================ 1. data
def default_episodes(n, actions, length):
    """--episodes 0: 200 trajectories per 512 moves (2-D: 128 cells), up to 2^24 transitions."""
    return min(200 * math.ceil(n * actions / 512), 2**24 // length)  # multinomial's limit


def collect_dataset(env, args, rng):
    """E trajectories of T steps at once: a random action with probability epsilon, else an optimal
    one to a target cell (redrawn when reached or out of the data's reach) -> int64 s, a, s2,
    episode, t, each (M = E T,), in time order: transition (e, t) is row t * E + e."""
    held = env.held_out(args.holdout, args.seed)  # (N,) bool: cells the data never visits
    split = args.data == "split"  # a move across the map's two halves stays in place
    nxt, d = env.data_map(held, split)  # (N, A), (N, N): held-out cells are walls, and the split
    n, actions = nxt.shape
    e = args.episodes or default_episodes(n, actions, args.episode_len)
    kept = np.flatnonzero(~held)  # (N_kept,)
    state = rng.choice(kept, size=e)  # (E,)
    target = rng.choice(kept, size=e)  # (E,)
    steps = []
    for t in range(args.episode_len):
        expert = gridworld.shortest_moves(nxt, d, state, target)  # (E, A); at g: none
        greedy = np.argmax(expert + rng.random((e, actions)), axis=1)  # one optimal at random
        uniform = rng.integers(actions, size=e)
        explore = rng.random(e) < args.epsilon
        act = np.where(explore | ~expert.any(1), uniform, greedy)
        moved = act
        if args.slip > 0:  # the move slips to one of the other actions; the data keeps `act`
            other = (act + 1 + rng.integers(actions - 1, size=e)) % actions
            slipped = rng.random(e) < args.slip
            moved = np.where(slipped, other, act)
        after = nxt[state, moved]  # into a held-out cell, or across the split: stay
        steps.append({"s": state, "a": act, "s2": after,
                      "episode": np.arange(e), "t": np.full(e, t)})
        state = after
        new_target = rng.choice(kept, size=e)
        reached = state == target
        lost = d[state, target] < 0  # out of the data's reach: behind held-out cells, the split
        target = np.where(reached | lost, new_target, target)
    columns = {key: np.concatenate([step[key] for step in steps]) for key in steps[0]}
    if args.data == "one-direction":  # of u -> v and v -> u, one way per pair (Sec. 3.4)
        s, s2 = columns["s"], columns["s2"]
        forward = rng.random((n, n)) < 0.5  # [u, v] for u < v: whether u -> v is kept
        way_kept = forward[np.minimum(s, s2), np.maximum(s, s2)]  # (M,); bumps stay
        kept_rows = (s == s2) | (way_kept == (s < s2))  # no longer whole trajectories
        columns = {key: column[kept_rows] for key, column in columns.items()}
    return {key: torch.as_tensor(column) for key, column in columns.items()}


def cell_features(env, args):
    """Each cell's observation x: one-hot (N, N); its D coordinates in [-1, 1] and their sin and
    cos at L frequencies pi 2^0 .. pi 2^(L-1) (departure: Fourier features), (N, D + 2DL); or
    the RGB image of the map with the agent in that cell (Gymnasium's wrapper), (N, 3, H, W)."""
    if args.features == "onehot":
        return torch.eye(len(env.cells))
    if args.features == "image":
        images = gridworld.ImageObservation(env, args.tile).images(np.arange(len(env.cells)))
        return torch.as_tensor(images).permute(0, 3, 1, 2) / 255  # channels first, in [0, 1]
    size = (torch.tensor(env.grid.shape) - 1).clamp(min=1)  # (D,)
    xy = 2 * torch.tensor(env.cells, dtype=torch.float32) / size - 1  # (N, D) in [-1, 1]
    scales = math.pi * 2.0 ** torch.arange(args.fourier)  # (L,)
    angles = (xy[:, :, None] * scales).flatten(1)  # (N, DL)
    return torch.cat([xy, angles.sin(), angles.cos()], dim=1)


def torso(args, x):
    """What reads x (N, ...) -> (N, F), a list of layers, and F: for images the paper's CNN, four
    3 x 3 convolutions, strides 1, 2, 2, 2, no padding, flattened (then theirs: 64 units)."""
    if args.features != "image":
        return [], x.shape[1]
    # black pixels right and below to 8 m + 9 a side, where the last layer sees every pixel
    pad_rows, pad_cols = [(9 - side) % 8 for side in x.shape[2:]]
    c = args.channels
    layers = [nn.ZeroPad2d((0, pad_cols, 0, pad_rows)), nn.Conv2d(3, c, 3), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Conv2d(c, c, 3, stride=2), nn.ReLU()]
    cnn = nn.Sequential(*layers, nn.Flatten())
    return [cnn], cnn(x[:1]).shape[1]  # F: C x the last feature map's pixels


class PairNet(nn.Module):
    """An MLP on [x_s; x_g]: the actor pi(a | s, g), or td's V(s, g); torso: a CNN on images."""
    def __init__(self, features, hidden, outputs, torso=()):
        super().__init__()
        self.torso = nn.Sequential(*torso)  # no layer: x as it is
        self.s_in = nn.Linear(features, hidden)  # W_s, b
        self.g_in = nn.Linear(features, hidden, bias=False)  # W_g
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, outputs))

    def forward(self, x, s, g):
        """x (N, ...), s, g (B,) -> (B, outputs); each cell's W_s x + W_g x once, gathered."""
        h = self.torso(x)  # (N, F)
        from_s = self.s_in(h).index_select(0, s)  # (B, hidden)
        from_g = self.g_in(h).index_select(0, g)  # (B, hidden)
        return self.body(from_s + from_g)


def build_critic(env, args, x):
    """The critic: phi for metricrl (bfs: BFS's table), td's V(s, g), or None (gcbc)."""
    if args.algo == "gcbc":
        return None
    layers, f = torso(args, x)
    if args.algo == "td":
        return PairNet(f, args.hidden, outputs=1, torso=layers)
    if args.critic == "bfs":  # the BFS distance as a frozen table: an oracle
        d = torch.tensor(env.distance_matrix(), dtype=torch.float32)  # -1: no path from s to g
        return nn.Embedding.from_pretrained(d.where(d >= 0, float(len(env.cells))))  # then N
    if args.critic == "exact":  # linear, k = N (+ 1 super-state): a table on one-hot cells
        return nn.Sequential(*layers, nn.Linear(f, len(env.cells) + args.super_state, bias=False))
    h = args.hidden  # phi: F -> k, an MLP (departure: theirs is residual); add layers here
    return nn.Sequential(*layers, nn.Linear(f, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                         nn.Linear(h, args.latent))


def build(env, args, device):
    """The observations x (N, ...), the critic (or None) and the actor, on the device. --hidden
    0: 128 units, phi's and pi's, 256 past 8 (a hypermaze's 3^d: docs/hypermaze.md)."""
    wide = len(env.moves) > 8
    args = dataclasses.replace(args, hidden=args.hidden or (256 if wide else 128))
    x = cell_features(env, args)
    critic = build_critic(env, args, x)
    layers, f = torso(args, x)  # the actor's CNN, unless it reads the critic's (actor_input)
    if layers and args.algo != "gcbc" and args.critic != "bfs":
        layers = []  # the same F features, from the critic's CNN
    actor = PairNet(f, args.hidden, len(env.moves), torso=layers).to(device)  # A logits
    if critic is not None:
        critic = critic.to(device)
    return x.to(device), critic, actor


@torch.no_grad()
def actor_input(critic, x, args):
    """What the actor reads: x; with images and a learned critic, the critic's CNN features (N, F),
    standardized: a torso shared, trained by the critic's loss (departure: docs/observations.md)."""
    if args.features != "image" or args.algo == "gcbc" or args.critic == "bfs":
        return x
    cnn = critic.torso if args.algo == "td" else critic[0]
    h = cnn(x)  # (N, F), most of it the map that every image shows alike: standardized
    return (h - h.mean(0)) / h.std(0).clamp(min=1e-3)  # a constant feature stays about 0


# =========================================================== 2. critic (paper Sec. 3)
def weighted_mean(values, counts):
    """The mean over pairs when each entry of values stands for `counts` of them."""
    return (counts * values).sum() / counts.sum().clamp(min=1)


def metric_loss(d, moves, pairs, args):
    """The critic's loss (Sec. 3) from d (N, N) = d_phi of every pair, counted by pair_counts():
      positive = mean over moves s -> s'                     (d_phi(s, s') - 1)^2
      negative = mean over other pairs (s_i, s'_j), i != j   -log d_phi(s_i, s'_j)
      loss     = positive + lambda * negative"""
    positive = weighted_mean((d - 1) ** 2, moves)
    negative = weighted_mean(-torch.log(d + 1e-6), pairs)
    return positive + args.lam * negative, {"positive": positive, "negative": negative}


def pair_counts(data, n):
    """The whole dataset as one batch, counted per pair of cells u != v (departure):
      moves (N, N)  [u, v] = the transitions u -> v             (the positive term's pairs)
      pairs (N, N)  [u, v] = the pairs s_i = u, s'_j = v, i != j  (the negative term's)"""
    starts = torch.bincount(data["s"], minlength=n).float()  # (N,) transitions from u
    ends = torch.bincount(data["s2"], minlength=n).float()  # (N,) transitions into v
    edge = data["s"] * n + data["s2"]  # (M,) u -> v as one index
    moves = torch.bincount(edge, minlength=n * n).float().view(n, n)
    moves.fill_diagonal_(0)  # s' = s, a bump into a wall: no move to pull to length 1
    # every (i, j) with s_i = u and s'_j = v, less the i = j ones, which are the moves
    pairs = starts[:, None] * ends[None, :] - moves
    pairs.fill_diagonal_(0)  # s_i = s'_j: one cell, distance 0, nothing to push
    return moves, pairs


def exact_loss(z, edges, moves, pairs, mu):
    """--critic exact (beyond the paper): z (N, k = N), z_c per cell c, d_phi = max-relu (below):
      loss = -mean_(s, g) min(z_g(s) - z_g(g), N)
             + mu * mean_(u -> v, c) relu(z_c(u) - z_c(v) - 1)^2
    Why d(s, g): summed along a path of the data's moves, z_c(u) <= z_c(v) + 1 gives z_c(s) -
    z_c(g) <= d(s, g); the push raises z_g(s) - z_g(g) to it (cap N: unreachable). No BFS."""
    u, v = edges  # (K,) each: the data's K distinct moves u -> v (train() finds them once)
    rise = z - z.diagonal()  # (N, N): [s, g] = z_g(s) - z_g(g), row s less the diagonal
    raised = weighted_mean(rise.clamp(max=len(z)), moves + pairs)  # over the data's pairs
    slack = z[u] - z[v] - 1  # (K, N) z_c(u) - z_c(v) - 1
    violation = (slack.relu() ** 2).sum() / max(1, u.numel() * z.shape[1])
    return -raised + mu * violation, {"push": raised, "violation": violation}


def with_super_state(data, args, n):
    """--super-state (Sec. 3.4): a move from each trajectory's end to one virtual state, n."""
    last = data["s2"][-(len(data["s"]) // args.episode_len):]  # (E,) t = T - 1: the ends
    s2 = torch.cat([data["s2"], torch.full_like(last, n)])
    return {"s": torch.cat([data["s"], last]), "s2": s2}  # for pair_counts()


def embed(critic, x, args):
    """phi of every cell, (N, k); with --super-state one more row, from all-zero features."""
    if args.super_state:
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return critic(x)


# ======================================= 3. value (Sec. 3.1) and advantage (Sec. 3.3)
def latent_distance(z, zg, metric="euclidean"):
    """d_phi(s, g) row by row: z, zg (..., k) -> (...). euclidean: ||z - zg||, the paper's;
      quasimetric  ||z_a - zg_a|| + max_i relu(z_b - zg_b)_i on the halves a, b of the
                   coordinates (Liu et al. 2023), asymmetric; max-relu: --critic exact's"""
    if metric == "euclidean":
        return (z - zg).norm(dim=-1)
    half = z.shape[-1] // 2 if metric == "quasimetric" else 0
    symmetric = (z[..., :half] - zg[..., :half]).norm(dim=-1)  # 0 for max-relu
    one_way = (z[..., half:] - zg[..., half:]).relu().amax(-1)
    return symmetric + one_way


def pairwise(z, z2, metric="euclidean"):
    """All pairs: z (N, k), z2 (N2, k) -> (N, N2), [i, j] = d_phi(z_i, z2_j)."""
    if metric == "euclidean":
        return torch.cdist(z, z2)
    rows = max(1, 2**24 // z2.numel())  # (rows, N2, k) at a time, to bound the memory
    parts = [latent_distance(chunk[:, None], z2[None], metric) for chunk in z.split(rows)]
    return torch.cat(parts)


def value(d, gamma):
    """V(s, g) = gamma^{d_phi(s, g)} * r_g with r_g = 1 (Sec. 3.1)."""
    return gamma ** d


def td_distance(v, gamma):
    """td's distance: V = gamma^d, so d = log_gamma V = log V / log gamma."""
    return torch.log(v.clamp(1e-6, 1)) / math.log(gamma)


def advantage_weights(d, d2, args):
    """The actor's weights from d = d(s, g) and d2 = d(s', g), (B,) each:
      A = log_gamma V(s, g) - log_gamma V(s', g) = d - d2   (departure: in steps, not in V)
      exp     w = min(exp(beta A), w_max)                   (departure: clipped AWR weights)
      linear  w = A                                         (the authors' code; can be < 0)"""
    advantage = d - d2  # (B,)
    if args.weighting == "linear":
        return advantage
    return torch.exp(args.beta * advantage).clamp(max=args.w_max)


# ================================================================ 4. actor (Sec. 3.3)
def actor_loss(logits, a, w):
    """Weighted imitation, -mean_i w_i log pi(a_i | s_i, g_i): logits (B, A), a, w (B,); with
    --actions all, a None and w (B, A_d), a weight for each action: -mean_i sum_a w_ia log pi."""
    logp = torch.log_softmax(logits, dim=-1)  # (B, A)
    if a is None:
        return -(w * logp[:, :w.shape[1]]).sum(1).mean()
    logp_a = logp.gather(1, a[:, None]).squeeze(1)  # (B,)
    return -(w * logp_a).mean()


def balance(data):
    """For --goals uniform: the cells the data leaves from (C,), a weight per transition (M,),
    1 / (n(s, a) k(s)), n(s, a) moves (s, a), k(s) actions at s: a draw's s is a uniform cell, a
    a uniform action there; --actions all: moves (C', A_d), the data's next cell of (s, a) or -1."""
    a_max = int(data["a"].max()) + 1  # above every action of the data: (s, a) as one index
    move = a_max * data["s"] + data["a"]  # (M,) the move (s, a) as one index
    per_move = torch.bincount(move)[move]  # (M,) n(s, a)
    actions = torch.bincount(torch.unique(move) // a_max)  # k(s) for s = 0, 1, ... to the last
    per_cell = actions[data["s"]]  # (M,) k(s)
    moves = torch.full((len(actions), a_max), -1, device=move.device)
    moves[data["s"], data["a"]] = data["s2"]  # with --slip: one of the cells it went to
    return {"cells": actions.nonzero()[:, 0], "weight": 1 / (per_move * per_cell), "moves": moves}


def sample(data, n, goals, args):
    """n transitions (s, a, s') of the data and a goal g each, (n,). goals: uniform: s a uniform
    cell, a uniform action there, g a uniform data cell (departure); random, hindsight: any
    transition, g any dataset state (the paper's) or a later state of its trajectory (GCBC's)"""
    m = len(data["s"])
    device = data["s"].device
    if goals == "uniform":
        i = torch.multinomial(data["weight"], n, replacement=True)  # (n,)
    else:
        i = torch.randint(m, (n,), device=device)
    s, a, s2, g = data["s"][i], data["a"][i], data["s2"][i], None
    if goals == "uniform":
        g = data["cells"][torch.randint(len(data["cells"]), (n,), device=device)]
    elif goals == "random":
        g = data["s"][torch.randint(m, (n,), device=device)]
    elif goals in ("hindsight", "mixed"):
        # the s' of a uniform later step t' in [t, T) of the same trajectory e, which is
        # row t' * E + e of the time-ordered data (collect_dataset)
        t = data["t"][i]
        later = t + (torch.rand(n, device=device) * (args.episode_len - t)).long()
        g = data["s2"][later * (m // args.episode_len) + data["episode"][i]]
    if goals == "mixed":  # td's: either, half each
        other = data["s"][torch.randint(m, (n,), device=device)]
        g = torch.where(torch.rand(n, device=device) < 0.5, g, other)
    return s, a, s2, g


# ========================= 5. baselines: the same data and actor, another critic or none
def td_loss(v, v_target, x, s, s2, g, args):
    """td, the critic MetricRL replaces; s, s2, g (B,) (gcbc has no critic: every weight 1):
      y    = gamma * (1 if s' = g else V_target(s', g))     so V* = gamma^d, as in MetricRL
      loss = mean |tau - 1(y < V(s, g))| (y - V(s, g))^2     expectile regression (IQL)"""
    with torch.no_grad():
        y = args.gamma * torch.where(s2 == g, 1.0, v_target(x, s2, g)[:, 0])  # (B,)
    u = y - v(x, s, g)[:, 0]  # (B,)
    keep = (s != g).float()  # V(g, g) = 1 is not learned
    tau = torch.where(u < 0, 1 - args.expectile, args.expectile)
    return (keep * tau * u ** 2).sum() / keep.sum().clamp(min=1)


# ========================================================== 6. training (Algorithm 1)
TARGET_RATE = 0.5  # td: V_target moves this share of the way to V after each step (tuned)
EXACT_DUAL_RATE, EXACT_DUAL_MAX = 1e4, 1e6  # mu += rate * violation, capped (docs/exact-critic.md)
EXACT_LR, EXACT_BETAS = 0.2, (0.5, 0.9)  # --critic exact's Adam (docs/history.md); lr falls


def critic_step(critic, x, data, counts, args, memory):
    """The critic's loss, its terms, phi of every cell z (N, k); memory: V_target, mu."""
    if args.algo == "td":
        with torch.no_grad():  # V_target moves TARGET_RATE of the way to V (Polyak)
            for p_target, p in zip(memory["target"].parameters(), critic.parameters()):
                p_target.lerp_(p, TARGET_RATE)
        s, _, s2, g = sample(data, args.actor_batch, "mixed", args)  # (B_actor,)
        loss = td_loss(critic, memory["target"], x, s, s2, g, args)
        return loss, {"td_loss": loss}, None
    z = embed(critic, x, args)  # (N, k): phi of every cell, a batch gathers rows (departure)
    moves, pairs, edges = counts
    if args.critic != "exact":  # the whole dataset, per pair of cells (departure)
        loss, info = metric_loss(pairwise(z, z, args.metric), moves, pairs, args)
        return loss, info, z
    loss, info = exact_loss(z, edges, moves, pairs, memory["mu"])
    rise = EXACT_DUAL_RATE * info["violation"].detach()  # dual ascent: mu grows with it
    memory["mu"] = (memory["mu"] + rise).clamp(max=EXACT_DUAL_MAX)
    return loss, info, z


@torch.no_grad()
def actor_weights(critic, x, z, s, s2, g, args):
    """w (B,) from the critic's distance to g from s and s' (d_phi, log_gamma V, BFS); gcbc: 1."""
    if critic is None:
        return torch.ones_like(s, dtype=torch.float)
    if args.critic == "bfs":
        d, d2 = critic.weight[s, g], critic.weight[s2, g]
    elif args.algo == "td":
        d = td_distance(critic(x, s, g)[:, 0], args.gamma)
        d2 = td_distance(critic(x, s2, g)[:, 0], args.gamma)
    else:
        metric = "max-relu" if args.critic == "exact" else args.metric
        d = latent_distance(z[s], z[g], metric)
        d2 = latent_distance(z[s2], z[g], metric)
    return advantage_weights(d, d2, args)


def actor_step(critic, actor, x, z, data, args):
    """The actor's loss (Sec. 3.3) on (s, g)s: for one drawn action of the data each, or (--actions
    all) for every a the data took at s, w(s, a, g) / k(s): that loss's mean over a at s."""
    s, a, s2, g = sample(data, args.actor_batch, args.goals, args)  # (B,)
    logits = actor(actor_input(critic, x, args), s, g)  # (B, A)
    if args.actions == "one":
        return actor_loss(logits, a, actor_weights(critic, x, z, s, s2, g, args))
    dz = critic_distances(critic, x, args)  # (N, N), no gradient
    nexts = data["moves"][s]  # (B, A_d) each action's next cell, -1: a move the data lacks
    taken = (nexts >= 0).float()
    d2 = dz[nexts.clamp(min=0), g[:, None]]  # (B, A_d) d(s', g)
    w = advantage_weights(dz[s, g][:, None], d2, args) * taken  # (B, A_d)
    return actor_loss(logits, None, w / taken.sum(1, keepdim=True))  # / k(s): a uniform a at s


def learning_rates(done, args, actor_from):
    """The critic's and the actor's after `done` steps: the critic's --lr (exact's, 0.2 falling
    towards 0); the actor's --lr from its first step, falling linearly towards 0 (departure)."""
    critic = EXACT_LR * (1 - done / args.steps) if args.critic == "exact" else args.lr
    span = max(1, args.steps - actor_from)
    return critic, args.lr * min(1.0, (args.steps - done) / span)


def train(data, x, critic, actor, args, truth=None):
    """Algorithm 1: the critic alone for the first `critic_only` share of the steps, then both
    in one backward pass (gcbc, --critic bfs: the actor only) -> the history of Progress."""
    args = with_budgets(args, len(x), actor.body[-1].out_features)  # 0, auto: by the map, A
    learns_critic = critic is not None and args.critic != "bfs"
    actor_from = int(args.critic_only * args.steps) if learns_critic else 0
    critic_group = {"params": critic.parameters() if critic is not None else []}
    if args.critic == "exact":
        critic_group["betas"] = EXACT_BETAS
    groups = [critic_group, {"params": actor.parameters()}]
    optimizer = torch.optim.Adam(groups, lr=args.lr, fused=True)
    critic_group, actor_group = optimizer.param_groups  # their lr is set at each step
    memory = {"target": None, "mu": torch.ones((), device=x.device)}
    if args.algo == "td":
        memory["target"] = copy.deepcopy(critic)
    data = {**data, **balance(data)}
    critic_data = data
    if args.super_state:
        critic_data = with_super_state(data, args, len(x))
    moves, pairs = pair_counts(critic_data, len(x) + args.super_state)
    counts = moves, pairs, moves.nonzero().T  # edges once: nonzero() waits for the device
    log = Progress(args, critic, actor, x, truth)
    for step in range(1, args.steps + 1):
        critic_group["lr"], actor_group["lr"] = learning_rates(step - 1, args, actor_from)
        loss, info, z = 0.0, {}, None
        if learns_critic:
            loss, info, z = critic_step(critic, x, critic_data, counts, args, memory)
            info["critic_loss"] = loss
        if step > actor_from:
            info["actor_loss"] = actor_step(critic, actor, x, z, data, args)
            loss = loss + info["actor_loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.add(step, info)
    return log.history


# ========================================================= 7. evaluation (exact, BFS)
LIMIT = gridworld.gymnasium.spec("GridWorld-v0").max_episode_steps  # rollout steps: 1000


def ground_truth(env, args, device):
    """BFS's truth: nxt (N, A), d (N, N) (-1: unreachable), unseen (N, N): the pairs with an end
    the data never visits (--holdout), task (N, N): a key-and-door map's (start, goal) pairs. No
    (N, N, A) table (5 GB on hypermaze4): optimal_rate()."""
    nxt = torch.as_tensor(np.array(env.transitions()), device=device)
    d = torch.as_tensor(np.array(env.distance_matrix()), device=device)
    held = torch.as_tensor(env.held_out(args.holdout, args.seed), device=device)  # (N,)
    task = torch.zeros_like(d, dtype=torch.bool)  # (N, N) the paper's task (Fig. 1): its pairs
    if env.task() is not None:  # a key-and-door map's: from its start to each goal
        task[env.task()] = True
    return {"nxt": nxt, "d": d, "unseen": held[:, None] | held[None, :], "task": task}


@torch.no_grad()
def pair_table(net, x, greedy=False, chunk=1 << 16):
    """A PairNet on all pairs, by chunks of p = s N + g: (N, N, outputs), or greedy (N, N)."""
    n = len(x)
    parts = []
    for p in torch.arange(n * n, device=x.device).split(chunk):
        out = net(x, p // n, p % n)  # (chunk, outputs)
        parts.append(out.argmax(-1) if greedy else out)
    return torch.cat(parts).view(n, n, *parts[0].shape[1:])


@torch.no_grad()
def critic_distances(critic, x, args):
    """The critic's distance for every pair, (N, N): d_phi, log_gamma V, BFS's, None (gcbc)."""
    if args.critic == "bfs":
        return critic.weight
    if args.algo == "td":
        return td_distance(pair_table(critic, x)[..., 0], args.gamma)
    if args.algo == "gcbc":
        return None
    z = embed(critic, x, args)[:len(x)]  # (N, k), without the super-state
    metric = "max-relu" if args.critic == "exact" else args.metric
    return pairwise(z, z, metric)


def rollout(table, nxt, limit, slip=0.0, seed=0):
    """The policy table (N, N) rolled out from every s to every g at once, up to `limit` steps
    -> reached (N, N) bool, steps (N, N). Back at a cell, a deterministic table loops: failed
    (Brent: a pair saves its cell at steps 1, 2, 4, ..., a loop of length L returns to 2^j >= L)."""
    gen = torch.Generator(device=table.device).manual_seed(seed)
    n, actions = nxt.shape
    pair = torch.arange(n * n, device=table.device)  # (P,) P = N^2 pairs, p = s * N + g
    pos, goal = pair // n, pair % n  # (P,) each pair's cell and goal
    steps = torch.zeros_like(pair)
    saved = pos.clone()  # the cell at the last power of two
    live = pair[pos != goal]  # (P_live,) the pairs on their way
    for t in range(1, limit + 1):
        if len(live) == 0:
            break
        act = table[pos[live], goal[live]]  # (P_live,)
        if slip > 0:  # a slip turns the action into one of the other A - 1
            turn = 1 + torch.randint(actions - 1, act.shape, generator=gen, device=act.device)
            slipped = torch.rand(act.shape, generator=gen, device=act.device) < slip
            act = torch.where(slipped, (act + turn) % actions, act)
        pos[live] = nxt[pos[live], act]
        steps[live] += 1
        going = pos[live] != goal[live]
        if slip == 0:  # with slips a return proves nothing
            going &= pos[live] != saved[live]  # back at the saved cell: a loop
        live = live[going]
        if t & (t - 1) == 0:  # t is a power of two
            saved[live] = pos[live]
    return (pos == goal).view(n, n), steps.view(n, n)


def monotonicity(dz, d, triplets=200_000, seed=0):
    """Distance monotonicity (Sec. 3.1): of seeded triplets with d(s1, g) < d(s2, g) (none
    equal or unreachable), the share with d_phi(s1, g) < d_phi(s2, g) (a tie counts as not)."""
    gen = torch.Generator().manual_seed(seed)
    s1, s2, g = torch.randint(len(d), (3, triplets), generator=gen).to(d.device)
    d1, d2 = d[s1, g], d[s2, g]
    keep = (d1 >= 0) & (d2 >= 0) & (d1 != d2)
    near = torch.where(d1 < d2, s1, s2)[keep]
    far = torch.where(d1 < d2, s2, s1)[keep]
    kept = dz[near, g[keep]] < dz[far, g[keep]]
    return kept.double().mean().item()


def optimal_rate(table, truth, mask):
    """Of the pairs in mask (N, N), the share whose action a in the table (N, N) is optimal."""
    d = truth["d"]
    after = truth["nxt"].gather(1, table)  # (N, N): [s, g] = next(s, table[s, g])
    on_path = d.gather(0, after) == d - 1  # (N, N): d(next(s, a), g) = d(s, g) - 1
    return on_path[mask].double().mean().item()


@torch.no_grad()
def evaluate(dz, actor, x, truth, slip=0.0, limit=LIMIT):
    """Every metric over all reachable pairs s != g, against BFS: of the actor's greedy
    policy as a table, and of the critic's distances dz (N, N) (None: no critic, nan)."""
    d, nxt = truth["d"], truth["nxt"]
    reachable = d > 0  # (N, N): a path from s to g, s != g
    policy = pair_table(actor, x, greedy=True)  # (N, N) the greedy action
    reached, steps = rollout(policy, nxt, limit, slip=slip)
    ok = reached & reachable
    metrics = {"success_rate": ok[reachable].double().mean().item(), "path_ratio": math.nan}
    if ok.any():
        metrics["path_ratio"] = (steps[ok] / d[ok]).mean().item()
    metrics["optimal_action_rate"] = optimal_rate(policy, truth, reachable)
    seen, task = reachable & ~truth["unseen"], reachable & truth["task"]
    parts = {"seen": seen, "unseen": reachable & ~seen, "task": task}  # none: their metrics nan
    for part, mask in parts.items():
        metrics[f"success_{part}"] = ok[mask].double().mean().item()
        metrics[f"critic_success_{part}"] = math.nan  # below, if there is a critic
    if dz is None:
        return {**metrics, **dict.fromkeys(CRITIC_METRICS, math.nan)}
    # the critic's own policy: argmin_a dz(next(s, a), g), by rows (dz[nxt]: 20 GB, hypermaze4)
    rows = max(1, 2**24 // nxt.numel())
    greedy = torch.cat([dz[block].argmin(dim=1) for block in nxt.split(rows)])
    critic_reached, _ = rollout(greedy, nxt, limit, slip=slip)
    error = (dz[reachable] - d[reachable]).abs()  # |d_phi(s, g) - d(s, g)|; the oracle's: 0
    metrics["value_greedy_rate"] = optimal_rate(greedy, truth, reachable)
    metrics["critic_success_rate"] = critic_reached[reachable].double().mean().item()
    metrics["spearman"] = spearman(dz[reachable], d[reachable].double())
    metrics["monotonicity"] = monotonicity(dz, d)
    metrics["distance_error"] = error.mean().item()
    metrics["distance_error_max"] = error.max().item()
    for part, mask in parts.items():
        metrics[f"critic_success_{part}"] = critic_reached[mask].double().mean().item()
    return metrics


# ====================================================== 8. one run, from data to files
OUTPUTS = ("metrics.json", "log.csv", "model.pt", "metricrl.png")
CRITIC_METRICS = ("value_greedy_rate", "critic_success_rate", "spearman", "monotonicity",
                  "distance_error", "distance_error_max")  # nan without a critic
METRICS = ("success_rate", "path_ratio", "optimal_action_rate", *CRITIC_METRICS)
SEEN_METRICS = ("success_seen", "success_unseen", "critic_success_seen", "critic_success_unseen")
TASK_METRICS = ("success_task", "critic_success_task")  # a key-and-door map's task (Fig. 1)


def spearman(x, y):
    """Spearman rank correlation: the Pearson correlation of the ranks (ties: their mean)."""
    ranks = []
    for v in (x, y):
        _, inverse, counts = torch.unique(v, return_inverse=True, return_counts=True)
        # in order, a value's last rank is the running count; its ties' mean: less (count - 1) / 2
        ranks.append((counts.cumsum(0) - (counts - 1) / 2)[inverse].double())
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


def behaviour_reward(env, args, start, goals):
    """The data's own expected reward on a task (Fig. 1's x-axis; departure: exact, not a mean
    over the data's trajectories): the chance that the data's behaviour (collect_dataset's,
    its slips included) reaches the goal from the start within T steps, its mean over the
    goals (G,): the law of s_t, pushed T times through the moves."""
    nxt, d = env.data_map(env.held_out(args.holdout, args.seed), args.data == "split")
    n, actions = nxt.shape
    s, g = np.repeat(np.arange(n), len(goals)), np.tile(goals, n)  # (N G,) each cell, each goal
    best = gridworld.shortest_moves(nxt, d, s, g).reshape(n, len(goals), actions)  # (N, G, A)
    share = best.sum(-1, keepdims=True)  # optimal actions at s, to g; none: any action
    expert = np.where(share > 0, best / np.maximum(share, 1), 1 / actions)
    policy = args.epsilon / actions + (1 - args.epsilon) * expert  # (N, G, A) pi(a | s, g)
    policy = (1 - args.slip) * policy + args.slip * (1 - policy) / (actions - 1)  # the move made
    at = np.zeros((len(goals), n))  # (G, N) the law of s_t, an episode per goal
    at[:, start] = 1
    into = np.arange(len(goals))[:, None, None] * n + nxt  # (G, N, A) (goal, s') as one index
    arrive, reward = (np.arange(len(goals)), goals), np.zeros(len(goals))
    for _ in range(args.episode_len):
        flow = at[:, :, None] * policy.transpose(1, 0, 2)  # (G, N, A) P(s_t = s, a_t = a)
        at = np.bincount(into.ravel(), flow.ravel(), minlength=at.size).reshape(at.shape)
        reward += at[arrive]  # reward 1 on reaching g, where the episode ends:
        at[arrive] = 0
    return float(reward.mean())


def run(args):
    """One run: data -> critic and actor -> exact evaluation -> files in --out's folder."""
    start = time.time()
    env, device = setup(args)
    out = args.out or os.path.join("runs", run_name(args))
    with staged(out, OUTPUTS) as tmp:
        torch.manual_seed(args.seed)
        data = collect_dataset(env, args, np.random.default_rng(args.seed))
        data = {key: column.to(device) for key, column in data.items()}
        truth = ground_truth(env, args, device)
        cells = torch.unique(torch.cat([data["s"], data["s2"]]))  # the data's coverage
        moves = torch.unique(len(env.moves) * data["s"] + data["a"])  # (s, a) as one index
        coverage = {"transitions": len(data["s"]), "cell_coverage": len(cells) / len(env.cells),
                    "edge_coverage": len(moves) / env.transitions().size}
        x, critic, actor = build(env, args, device)
        if not args.quiet:
            steps = with_budgets(args, len(x), len(env.moves)).steps
            say(f"{args.env}: {len(x)} cells | data {coverage} | {device} | {steps} steps")
        history = train(data, x, critic, actor, args, truth)
        shown = METRICS + (SEEN_METRICS if args.holdout > 0 else ())
        shown += TASK_METRICS if env.task() is not None else ()  # a key: the paper's task
        metrics = {key: history[-1][key] for key in shown}
        if env.task() is not None:  # and the data's own reward on it (Fig. 1's x-axis)
            metrics["data_reward"] = behaviour_reward(env, args, *env.task())
            shown += ("data_reward",)
        plot_run(tmp, env, args, x, critic, actor, data, truth, history, metrics)
        speed = float(np.median([row["steps_per_s"] for row in history]))
        metrics.update(env=args.env, algo=args.algo, run=run_name(args), seed=args.seed,
                       device=str(device), steps=history[-1]["step"], train_steps_per_s=speed)
        metrics.update(seconds=round(time.time() - start, 2), dataset=coverage, cells=len(x),
                       actions=len(env.moves), flags=dataclasses.asdict(args))
        write_files(tmp, env, args, critic, actor, history, metrics)
    if not args.quiet:  # where the files are, and the metrics
        say(f"wrote {os.path.join(out, '')} ({', '.join(OUTPUTS)}) in {metrics['seconds']:.1f} s")
        say("\n".join(f"  {key:21s} {metrics[key]:.3f}" for key in shown))
    return metrics


class Progress:
    """train()'s log: losses summed on the device (no host sync in a step), a row of means."""
    def __init__(self, args, critic, actor, x, truth):
        self.args, self.critic, self.actor, self.x, self.truth = args, critic, actor, x, truth
        self.totals, self.counts, self.history = {}, {}, []  # per key: losses' sum, steps; rows
        self.tick, self.last = time.time(), 0  # when and at which step the last row was
        self.phase = (set(), time.time(), 0)  # the losses trained, since when, from which step

    def add(self, step, info):
        if set(info) != self.phase[0]:  # the actor starts: slower steps, timed after this one
            self.phase = (set(info), time.time(), step)
        for key, loss in info.items():
            self.totals[key] = self.totals.get(key, 0) + loss.detach()
            self.counts[key] = self.counts.get(key, 0) + 1
        scored = step % self.args.eval_every == 0 or step == self.args.steps
        if not scored and time.time() - self.tick <= 30:  # a row at least every 30 s
            return
        row = {"step": step}  # the host waits for the device from here, never inside a step
        for key, total in self.totals.items():
            row[key] = total.item() / self.counts[key]
            if not math.isfinite(row[key]):
                raise FloatingPointError(f"training diverged: at step {step} the {key} is "
                                         f"{row[key]}; try a smaller --lr")
        row["steps_per_s"] = (step - self.last) / max(time.time() - self.tick, 1e-6)
        if scored and self.truth is not None:
            dz = critic_distances(self.critic, self.x, self.args)
            seen = actor_input(self.critic, self.x, self.args)
            row.update(evaluate(dz, self.actor, seen, self.truth, self.args.slip))
        self.history.append(row)
        phase, since, first = self.phase  # time left: a step's mean time since the actor began,
        left = (self.args.steps - step) * (time.time() - since) / max(step - first, 1) / 60
        if not self.args.quiet:  # evaluations in (smooth); before the actor, not known yet
            report(row, self.args, left if "actor_loss" in phase else None)
        self.totals, self.counts = {}, {}
        self.tick, self.last = time.time(), step


def report(row, args, minutes_left=None):
    """A progress line: mean losses since the last, speed, exact metrics, time left."""
    line = f"step {row['step']:6d}/{args.steps}"
    for name in ("critic", "actor"):
        if f"{name}_loss" in row:
            line += f"  {name} {row[name + '_loss']:7.3f}"
    line += f"  {row['steps_per_s']:5.0f} steps/s"
    if "success_rate" in row:  # an evaluated step (the unseen pairs: in the files)
        line += f" |  success {row['success_rate']:.3f}"
    if not math.isnan(row.get("critic_success_rate", math.nan)):  # and a critic
        line += f"  critic success {row['critic_success_rate']:.3f}"
        line += f"  |d_phi - d| {row['distance_error']:.3f}  max {row['distance_error_max']:.3f}"
    if minutes_left is not None and minutes_left > 1:
        line += f" | about {minutes_left:.1f} min left"
    say(line)


# ======================================================================== 9. the figure
def show_map(fig, ax, env, values, title, cmap, label, goal, plane=None, **kw):
    """Values per cell (N,) on the map (or on a plane, below; default: the goal's), a colorbar,
    the goal, and the map's one-way cells, key and door in red."""
    if values is None:
        ax.text(0.5, 0.5, title, ha="center", va="center", transform=ax.transAxes, fontsize=12)
        return ax.set_axis_off()
    plane = env.cells[goal, 2:] if plane is None else plane
    image = np.full((env.height, env.width), np.nan)
    shown = in_slice(env, plane)
    rows, cols = env.cells[shown, :2].T
    image[rows, cols] = np.asarray(values)[shown]
    shown = ax.imshow(np.ma.masked_invalid(image), cmap=cmap, **kw)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03, label=label)
    ax.set(title=title, xticks=[], yticks=[], facecolor="0.25")  # walls show the face colour
    row, col = env.cells[goal, :2]
    ax.plot(col, row, "*", color="white", ms=18, mec="k", label="goal g")
    grid = env.grid[(slice(None), slice(None), *plane)]  # (H, W) the plane's characters
    marked = [*gridworld.ONE_WAY, gridworld.KEY, gridworld.DOOR, gridworld.OPEN]  # as text
    for r, c in np.argwhere(np.isin(grid, marked)):
        ax.text(c, r, grid[r, c], ha="center", va="center", color="red", weight="bold")


def in_slice(env, plane):
    """(N,) bool: the cells of a plane: x_0, x_1 any, the others `plane`'s (a hypermaze's other
    coordinates, a key-and-door map's flags; a 2-D map's: all cells)."""
    return (env.cells[:, 2:] == plane).all(1)


VALUE_TITLES = {"metricrl": r"Learned $V(s, g) = \gamma^{d_\phi(s, g)}$",
                "td": "Learned V(s, g), by TD", "gcbc": "gcbc has no critic",
                "bfs": "--critic bfs: the true V"}  # by the kind of critic
FLAG_STATES = {(0, 0): "No key: ", (1, 0): "Key carried, door closed: ", (1, 1): "Door open: "}
DISTANCE_LABELS = {"metricrl": "learned d_φ(s, g)", "td": "learned log_γ V(s, g)",
                   "bfs": "BFS d(s, g), the oracle"}


@torch.no_grad()
def plot_run(folder, env, args, x, critic, actor, data, truth, history, metrics):
    """metricrl.png. Top, for one far goal g: learned and true V, the greedy policy, the data."""
    d = env.distance_matrix()
    goal = int(np.argmax(d.max(0)))  # the hardest goal: the farthest from some cell
    to_goal = np.where(d[:, goal] >= 0, d[:, goal], np.nan)  # (N,), nan: out of reach
    v_true = value(to_goal, args.gamma)
    low = np.nanmin(v_true)
    dz = critic_distances(critic, x, args)
    v = None
    if dz is not None:
        dz = dz.cpu().numpy()  # (N, N)
        v = value(dz[:, goal], args.gamma)
        low = min(low, np.nanmin(v))  # one colour scale for both
    kind = "bfs" if args.critic == "bfs" else args.algo  # the kind of critic
    fig = Figure(figsize=(20, 9.5))
    top, bottom = fig.subplots(2, 4)
    table = pair_table(actor, actor_input(critic, x, args), greedy=True)  # (N, N)
    reached = rollout(table, truth["nxt"], LIMIT)[0].cpu().numpy()  # as evaluate()
    table = table.cpu().numpy()
    if env.task() is None:
        show_map(fig, top[0], env, v, VALUE_TITLES[kind], "viridis", "V", goal, vmin=low, vmax=1)
        show_map(fig, top[1], env, v_true, r"True optimal $V^*(s, g) = \gamma^{d(s, g)}$",
                 "viridis", "V*", goal, vmin=low, vmax=1)
        plot_policy(fig, top[2], env, args, table, reached, goal, "Greedy π(·|s, g): ")
    else:  # a key-and-door map: V(., g) and the policy in each flag state (gcbc: distances)
        colours = None if v is None else (v, low)
        for ax, (plane, name) in zip(top, FLAG_STATES.items()):
            plot_policy(fig, ax, env, args, table, reached, goal, name, plane, colours)
    visits = np.bincount(data["s"].cpu().numpy(), minlength=len(x))  # (N,)
    if env.task() is not None:  # a key-and-door map: a cell's three flag states together
        where = env.cells[:, 0] * env.width + env.cells[:, 1]  # (N,) the state's cell
        visits = np.bincount(where, visits)[where]
    held = " (cyan □: held out)" if args.holdout > 0 else ""
    show_map(fig, top[3], env, visits, f"Offline data: visits per cell (ε = {args.epsilon})"
             + held, "magma", "visits", goal)
    held = env.held_out(args.holdout, args.seed) & in_slice(env, env.cells[goal, 2:])
    rows, cols = env.cells[held, :2].T
    top[3].plot(cols, rows, "s", mfc="none", mec="cyan", ms=9, mew=2, label="held out")
    plot_learning(fig, bottom, env, args, d, dz, critic, x, goal, to_goal, history, kind)
    title = figure_title(env, args, len(data["s"]), metrics, goal)
    fig.suptitle(title, size=13)
    top = 0.96 - 0.03 * (title.count("\n") + 1)  # 0.9 below two lines of title
    fig.subplots_adjust(left=0.035, right=0.955, bottom=0.07, top=top, wspace=0.34, hspace=0.24)
    fig.savefig(os.path.join(folder, "metricrl.png"), dpi=70)


def figure_title(env, args, transitions, metrics, goal):
    """The figure's title: the run, the exact metrics over all pairs, what the top row shows."""
    title = f"{run_name(args)} ({len(env.cells)} cells, {transitions} transitions of data, ε = "
    title += f"{args.epsilon})\nOver all pairs: success {metrics['success_rate']:.3f}"
    if not math.isnan(metrics["critic_success_rate"]):
        title += f", critic success {metrics['critic_success_rate']:.3f}"
        title += f", monotonicity {metrics['monotonicity']:.3f}"
    if args.holdout > 0:  # and over the pairs with a held-out end (the critic's: metrics.json)
        title += f"; pairs with a held-out end: success {metrics['success_unseen']:.3f}"
    goal_text = f"one far goal g = {tuple(env.cells[goal].tolist())}"
    if env.task() is not None:  # and on the paper's task; the top row: each flag state
        title += f"; the paper's task: success {metrics['success_task']:.3f}.\nTop row, for "
        title += f"{goal_text}: the greedy π(·|s, g) in each flag state, on the critic's V "
        return title + "(gcbc: on the true distance); ○: picks up, opens"
    title += f". Top row: {goal_text}"
    if env.grid.ndim > 2:
        title += ", the slice through it (x_0 down, x_1 across; arrows: moves' x_0, x_1 steps)"
    return title


def plot_policy(fig, ax, env, args, table, reached, goal, title, plane=None, v=None):
    """The greedy policy's move (table (N, N)) in every cell of a plane (default: the goal's)
    towards the goal, on the true distance (or a value: V, its low end); red x: fails."""
    plane = env.cells[goal, 2:] if plane is None else plane
    shown = in_slice(env, plane)  # (N,)
    to_goal = env.distance_matrix()[:, goal]
    fails = shown & ~reached[:, goal] & (to_goal > 0)  # (N,)
    title += f"{fails.sum()} of {(shown & (to_goal > 0)).sum()} cells fail (×)"
    if args.slip > 0:
        title += ", without slips"
    if env.grid.ndim > 2 and env.task() is None:  # a key-and-door map's: in the figure's title
        title += "; ○: leaves the slice"
    if v is None:
        colours = np.where(to_goal >= 0, to_goal, np.nan)
        show_map(fig, ax, env, colours, title, "Blues_r", "true distance to g", goal, plane)
    else:
        show_map(fig, ax, env, v[0], title, "viridis", "V", goal, plane, vmin=v[1], vmax=1)
    move = env.moves[table[shown, goal]]  # (N_shown, D) each cell's step
    small = 15 / max(env.height, env.width, 15)  # marks shrink on large maps
    rows, cols = env.cells[shown, :2].T
    ax.quiver(cols, rows, move[:, 1], move[:, 0], angles="xy", scale_units="xy", scale=1.6,
              width=0.006 * small, color="k")
    after = env.transitions()[np.flatnonzero(shown), table[shown, goal]]  # (N_shown,)
    leaves = (env.cells[after, 2:] != plane).any(1)  # off the plane: picks up, opens, or a slice
    ax.plot(cols[leaves], rows[leaves], "o", mfc="none", mec="k", ms=7 * small)
    ax.plot(cols[fails[shown]], rows[fails[shown]], "x", color="red", ms=9 * small, mew=2 * small)



def plot_learning(fig, axes, env, args, d, dz, critic, x, goal, to_goal, history, kind):
    """The exact metrics and losses in training; learned vs true distance; phi on 2 axes."""
    a_dist, a_phi, a_metrics, a_losses = axes
    a_actor = a_losses.twinx()  # the actor's own scale: its first rows dwarf the critic's
    a_actor.set_prop_cycle(color=["tab:red"])
    shown = ("success_rate", "critic_success_rate", "optimal_action_rate", "monotonicity")
    terms = ("positive", "negative", "td_loss", "push", "violation")  # the critics' losses
    curves = {a_metrics: shown, a_losses: terms, a_actor: ("actor_loss",)}
    if args.algo != "gcbc" and args.critic != "bfs":
        start = args.critic_only * history[-1]["step"]
        a_metrics.axvline(start, color="0.5", ls=":", label="actor starts")
    for ax, keys in curves.items():
        for key in keys:
            rows = [row for row in history if not math.isnan(row.get(key, math.nan))]
            if rows:
                ax.plot([row["step"] for row in rows], [row[key] for row in rows], "o-", ms=3,
                        label=key)
        if ax.lines:
            ax.legend(fontsize=8, loc="upper right" if ax is a_actor else "center right")
    a_metrics.set(title="Exact metrics during training", xlabel="gradient step", ylim=(0, 1.02))
    a_losses.set(title="Losses (means since the last point)", xlabel="step", ylabel="critic")
    a_actor.set_ylabel("actor (its own scale)", color="tab:red")
    if dz is None:
        show_map(fig, a_dist, env, None, f"{args.algo} has no critic", "", "", goal)
    else:  # the learned distance against the true one: the median and 10-90% of the pairs
        true, learned = d[d > 0], dz[d > 0]
        steps = np.arange(1, true.max() + 1)  # every true distance
        bands = np.array([np.percentile(learned[true == t], [10, 50, 90]) for t in steps])
        a_dist.fill_between(steps, bands[:, 0], bands[:, 2], alpha=0.3, label="10–90% of pairs")
        a_dist.plot(steps, bands[:, 1], label="median")
        a_dist.plot(steps, steps, "k--", lw=1, label="learned = true")
        a_dist.set(title=f"Learned vs true distance (mean error {abs(learned - true).mean():.2f})",
                       xlabel="true distance d(s, g) (BFS)", ylabel=DISTANCE_LABELS[kind])
        a_dist.legend()
    if args.algo == "metricrl" and args.critic != "bfs":
        plot_embedding(fig, a_phi, env, critic, x, args, goal, to_goal)
    else:
        show_map(fig, a_phi, env, None, "no embedding φ", "", "", goal)


def plot_embedding(fig, ax, env, critic, x, args, goal, to_goal):
    """phi (N, k) on its 2 principal axes, the moves as lines, coloured by distance to g."""
    z = embed(critic, x, args)[:len(x)].cpu().numpy()
    centred = z - z.mean(0)
    axes = np.linalg.svd(centred, full_matrices=False)[2][:2]  # (2, k)
    xy = centred @ axes.T  # (N, 2)
    nxt = env.transitions()[:, np.abs(env.moves).sum(1) == 1]  # (N, 2D) the axis moves (2-D: all)
    edges = np.stack([np.repeat(np.arange(len(z)), nxt.shape[1]), nxt.ravel()], axis=1)
    edges = edges[edges[:, 0] != edges[:, 1]]  # (E, 2) the moves that move, drawn both ways
    lines = LineCollection(xy[edges], color="k", lw=0.8, zorder=3)  # above the cells
    ax.add_collection(lines).set_alpha(min(0.6, 400 / len(edges)))  # hypermazes: fainter
    dots = ax.scatter(xy[:, 0], xy[:, 1], c=to_goal, s=30, plotnonfinite=True, zorder=2)
    fig.colorbar(dots, ax=ax, fraction=0.046, pad=0.03, label="true distance to g")
    ax.plot(xy[goal, 0], xy[goal, 1], "*", color="white", ms=18, mec="k")
    ax.set(title="φ(s) on 2 principal axes (black: axis moves)", xlabel="PC 1", ylabel="PC 2")


# =================================================== 10. files, checkpoints, command line
def write_files(folder, env, args, critic, actor, history, metrics):
    """model.pt (networks, flags, map, log), log.csv (a row per progress line), metrics.json."""
    ckpt = {"actor": actor.state_dict(), "history": history, "args": dataclasses.asdict(args),
            "layout": env.layout, "critic": critic.state_dict() if critic is not None else None}
    torch.save(ckpt, os.path.join(folder, "model.pt"))
    with open(os.path.join(folder, "log.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, list(dict.fromkeys(key for row in history for key in row)))
        writer.writeheader()
        writer.writerows(history)
    with open(os.path.join(folder, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)


def check_numbers(args):
    """Every number in its range (nan in none), ints below 2^31, floats finite."""
    for name in ("episode_len", "lr", "w_max", "tile", "channels"):
        require(args, name, getattr(args, name) > 0, "positive")
    for name in ("seed", "episodes", "steps", "eval_every", "actor_batch", "lam", "beta", "hidden"):
        require(args, name, getattr(args, name) >= 0, "0 or more")
    require(args, "fourier", 0 <= args.fourier <= 16, "in 0..16 (float32 resolves no more)")
    require(args, "episodes", args.episodes * args.episode_len <= 2**24, "at most 2^24 / T")
    require(args, "latent", args.latent >= 2, "2 or more (the figure projects phi on 2 axes)")
    for name in ("epsilon", "slip"):
        require(args, name, 0 <= getattr(args, name) <= 1, "in [0, 1]")
    for name in ("critic_only", "holdout"):
        require(args, name, 0 <= getattr(args, name) < 1, "in [0, 1)")
    require(args, "gamma", 0 < args.gamma <= 1, "in (0, 1]")
    require(args, "expectile", 0 < args.expectile < 1, "in (0, 1)")
    for name, setting in dataclasses.asdict(args).items():
        if type(setting) is int:
            require(args, name, setting < 2**31, "below 2^31")
        if type(setting) is float:
            require(args, name, math.isfinite(setting), "finite")


def check_args(args):
    """Raise UsageError for a value or a combination of flags that a run cannot use."""
    check_numbers(args)
    defaults = dataclasses.asdict(Args())
    changed = {k for k, v in dataclasses.asdict(args).items() if v != defaults.get(k)}
    if args.algo == "td" and args.gamma == 1:
        raise UsageError("td needs --gamma below 1 (its distance is log_gamma V)")
    if args.algo != "metricrl" and changed & {"super_state", "metric", "critic"}:
        raise UsageError("--super-state, --metric, --critic are MetricRL's: use --algo metricrl")
    if args.critic == "exact" and changed & {"metric", "latent", "lam"}:  # exact's are fixed
        raise UsageError("--critic exact has its own geometry (k = N) and loss: drop --metric, "
                         "--latent, --lam")
    if args.algo == "gcbc" and args.actions == "all":
        raise UsageError("--actions all weights every action by a critic; gcbc has none")
    hindsight = args.algo != "metricrl" or args.super_state or args.goals == "hindsight"
    if args.data == "one-direction" and hindsight:
        raise UsageError("--data one-direction keeps moves, not whole trajectories: no hindsight "
                         "goals (gcbc, td, --goals hindsight) and no --super-state")


def pick_device(name):
    """--device: auto (a GPU if there is one), cpu, cuda or cuda:N, checked."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    allowed = ["auto", "cpu", *(f"cuda:{i}" for i in range(gpus))] + ["cuda"] * (gpus > 0)
    if name in allowed:
        return torch.device(name.replace("auto", "cuda" if gpus else "cpu"))
    cuda = f", cuda or cuda:0 to cuda:{gpus - 1}"  # or why there is none
    cuda = cuda if gpus else f" (CUDA is not available, torch {torch.__version__})"
    raise UsageError(f"--device {name}: here auto, cpu{cuda}")


def with_budgets(args, n, actions):
    """The knobs left to the map, N cells, A actions (departures): --steps 0: 2,600, --critic exact
    16 N if more (exact by 1,000 steps on maze, 4,000 maze25, 20,000 maze51); --eval-every 0: 500,
    or 500 per 2,600 steps; --actor-batch 0: max(1,024, N^2 / 32); --goals auto: hindsight for
    gcbc (its weights cannot score other goals), else uniform; --actions auto: all for metricrl
    beyond 4 actions (not --critic exact: an N^3 table), else one."""
    exact = 16 * n if args.critic == "exact" else 0
    steps = args.steps or max(2600, exact)
    every = args.eval_every or max(500, steps * 500 // 2600)
    batch = args.actor_batch or max(1024, n * n // 32)
    goals, each = args.goals, args.actions
    if goals == "auto":
        goals = "hindsight" if args.algo == "gcbc" else "uniform"
    if each == "auto":
        cheap = args.algo == "metricrl" and args.critic != "exact"
        each = "all" if cheap and actions > 4 else "one"
    return dataclasses.replace(args, steps=steps, eval_every=every, actor_batch=batch,
                               goals=goals, actions=each)


def memory_needed(env, args):
    """Bytes a run needs, roughly: (N, N) tables, data, networks, batches, CNN feature maps."""
    n, actions = env.transitions().shape
    episodes = args.episodes or default_episodes(n, actions, args.episode_len)
    need = 250 * n * n + 100 * args.episode_len * episodes  # the tables, the data
    hidden = args.hidden or 256  # the widest rule; and the actor's (B, A) logits, weights
    batch = with_budgets(args, n, actions).actor_batch
    need += 16 * (5 * n * hidden + 3 * hidden ** 2) + 32 * batch * (hidden + actions)
    if args.features == "image":  # and the convolutions' weights, gradients, Adam's moments
        pixels = env.height * env.width * args.tile ** 2
        need += 16 * n * pixels * (1 + 2 * args.channels) + 500 * args.channels ** 2
    return need


def setup(args):
    """The map and the device, checked against the flags -> env, device."""
    device = pick_device(args.device)
    try:
        env = gridworld.GridWorld(args.env)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--env: {e}") from None
    need = memory_needed(env, args) / 2**30
    have = math.inf  # not known off POSIX
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory / 2**30
    elif os.name == "posix":
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if need > 0.8 * have:
        instead = "a smaller map" + " or --device cuda" * (device.type == "cpu")
        raise UsageError(f"--env {args.env} with these flags needs about {need:.1f} GB of memory; "
                         f"this {device.type} has {have:.1f} GB: use {instead}")
    if args.features == "image" and env.grid.ndim > 2:
        raise UsageError(f"--features image: an image shows a 2-D map's cells; {args.env}'s "
                         f"states have {env.grid.ndim} coordinates: use --features xy or onehot")
    if not (env.distance_matrix() > 0).any():
        raise UsageError(f"--env {args.env}: no free cell can reach another one")
    side = min(env.height, env.width) * args.tile  # the CNN's 4 layers need 17 pixels
    if args.features == "image" and side < 17:
        raise UsageError(f"--tile {args.tile}: --env {args.env}'s image is {side} pixels "
                         f"across, the CNN needs 17: --tile {math.ceil(17 / side * args.tile)}")
    held = env.held_out(args.holdout, args.seed)
    if (~held).sum() < 2:
        raise UsageError(f"--holdout {args.holdout} leaves no move to learn from on {args.env}")
    if args.holdout > 0 and not held.any():  # a map in pieces (a locked room): none can go
        raise UsageError(f"--holdout: no cell of {args.env} can be held out and keep the rest "
                         "connected")
    return env, device


def run_name(args, base=None):
    """The map, the algo, each knob unlike base's (the defaults), the seed: maze-gcbc-s0."""
    base = base or Args()
    name = [os.path.splitext(os.path.basename(args.env))[0], args.algo]
    for field in dataclasses.fields(base):  # metricrl_continuous.py: its own Args
        setting = getattr(args, field.name)
        flag = field.name.replace("_", "-")
        named = field.name in ("env", "algo", "seed", "device", "out", "quiet")
        if named or setting == getattr(base, field.name):  # named already, or changes nothing
            continue
        if setting is True:
            name.append(flag)
        elif type(setting) is float:
            name.append(f"{flag}={setting:g}")
        else:
            name.append(f"{flag}={setting}")
    return "-".join([*name, f"s{args.seed}"])


def main(argv=None):
    """The command line: python metricrl.py [knobs] runs one run; returns its metrics."""
    try:
        args, _ = parse_args(argv, Args)  # (the flags given: for experiments.py)
        check_args(args)
        return run(args)
    except (UsageError, FloatingPointError, KeyboardInterrupt) as e:
        exit_with_one_line("metricrl.py", e)


if __name__ == "__main__":
    main()

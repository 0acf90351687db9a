"""MetricRL (Reichlin et al., arXiv 2402.10820) on a gridworld, measured exactly against BFS.
Sections 1-7: the method in the paper's order (README.md maps them); then the tooling. Shapes:
N free cells, M transitions, B batch, F features per cell, k latent size."""
import argparse
import contextlib
import copy
import csv
import dataclasses
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
import typing

import numpy as np
import torch
import torch.nn as nn
from matplotlib.figure import Figure

import gridworld

LIMIT = gridworld.gymnasium.spec("GridWorld-v0").max_episode_steps  # rollout steps: 1000
NEGATIVES = ("log", "inverse", "raw")  # shapes of the critic's push, see push()
MODES = ("compare", "assumptions", "algos", "epsilons", "envs", "seeds")


@dataclasses.dataclass
class Args:  # each knob's comment is its --help text
    env: str = "maze"  # open, rooms, maze, loops, oneway, maze<N> (odd N >= 7), or a map file
    algo: typing.Literal["metricrl", "gcbc", "td"] = "metricrl"  # or a baseline: gcbc, td
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    seed: int = 0  # seeds the data and the networks (the evaluation is exact)
    episodes: int = 0  # offline trajectories; 0: 200 per 128 cells of the map
    episode_len: int = 100  # steps per trajectory
    epsilon: float = 1.0  # behaviour: random action with this probability, else an optimal one
    features: typing.Literal["onehot", "xy"] = "onehot"  # state features
    slip: float = 0.0  # probability that a move slips to another direction (data, rollouts)
    data: typing.Literal["all", "split"] = "all"  # split: the map's halves collected apart
    super_state: bool = False  # join every trajectory's end to one virtual state
    latent: int = 32  # k, the size of the embedding phi(s)
    hidden: int = 128  # width of the hidden layers of phi and pi
    critic: typing.Literal["paper", "exact", "bfs"] = "paper"  # exact: learns d; bfs: an oracle
    lam: float = 1.0  # lambda, weight of the negative (push) term
    metric: typing.Literal["euclidean", "quasimetric"] = "euclidean"  # d_phi, or asymmetric
    objective: typing.Literal["paper", "constrained"] = "paper"  # constrained: d(s, s') <= 1
    negative: typing.Literal[NEGATIVES] = "log"  # the push: -log d (the paper), 1/d, -d
    gamma: float = 0.99  # discount in V(s, g) = gamma^d(s, g)
    weighting: typing.Literal["exp", "linear"] = "exp"  # linear: w = A (the authors' code)
    beta: float = 6.0  # inverse temperature of the exp weights
    w_max: float = 1000.0  # clip of the exp weights: at beta 6, it binds for A > 1.15 steps
    goals: typing.Literal["auto", "uniform", "random", "hindsight"] = "auto"  # auto: gcbc hindsight
    expectile: float = 0.7  # td: expectile of the TD target
    steps: int = 2600  # gradient steps in all
    critic_only: float = 0.2  # share of the steps that train the critic alone (not gcbc)
    batch_size: int = 0  # critic batch: 0, the whole dataset; B > 0, B transitions
    actor_batch: int = 0  # (transition, goal) samples per actor step; 0: max(1024, N^2 / 32)
    lr: float = 3e-3  # Adam learning rate (the actor's falls linearly to 0; exact's critic: 0.2)
    eval_every: int = 500  # exact evaluation every this many steps
    out: str = ""  # output folder (default: runs/<map>-<algo>-<knobs changed>-s<seed>)
    load: str = ""  # re-evaluate this model.pt, write the run's files beside it (or in --out)
    quiet: bool = False  # no progress lines
    compare: bool = False  # run methods x data qualities, write compare.md and compare.png
    algos: str = "metricrl,metricrl-linear,gcbc,td"  # --compare: + metricrl-exact/bfs/inverse/raw
    epsilons: str = "0,0.25,0.5,0.75,1"  # --compare: behaviour epsilons
    envs: str = ""  # --compare: maps (default: --env)
    assumptions: bool = False  # runs where each assumption breaks: assumptions.md, .png
    seeds: int = 3  # --compare, --assumptions: seeds per row, from --seed on


# ============================================================================ 1. data
def collect_dataset(env, args, rng):
    """--episodes trajectories (0: 200 per 128 cells), run at once: a random action with probability
    epsilon, else an optimal one to a target cell. -> int64 s, a, s2, episode, t (M,), E x T."""
    nxt, opt = env.transitions(), env.optimal_actions()
    n, e = len(nxt), args.episodes or 200 * math.ceil(len(nxt) / 128)  # the data-size rule
    half = 2 * env.cells[:, 1] >= env.width  # (N,) the right half, for --data split
    state, target = rng.integers(n, size=e), rng.integers(n, size=e)
    steps = []
    for t in range(args.episode_len):  # vectorized over episodes
        expert = opt[state, target]  # (E, 4): optimal actions, all False at the target
        greedy = np.argmax(expert + rng.random((e, 4)), axis=1)  # a random optimal one
        uniform = rng.integers(4, size=e)
        act = np.where((rng.random(e) < args.epsilon) | ~expert.any(1), uniform, greedy)
        moved = act
        if args.slip:  # the move slips to one of the other three; the data keeps `act`
            other = (act + 1 + rng.integers(3, size=e)) % 4
            moved = np.where(rng.random(e) < args.slip, other, act)
        after = nxt[state, moved]
        if args.data == "split":  # a move between the map's halves stays in place
            after = np.where(half[after] == half[state], after, state)
        steps.append((state, act, after, np.arange(e), np.full(e, t)))
        state = after
        target = np.where(state == target, rng.integers(n, size=e), target)
    columns = [np.concatenate(c) for c in zip(*steps)]
    return dict(zip(("s", "a", "s2", "episode", "t"), map(torch.as_tensor, columns)))


class PairNet(nn.Module):
    """An MLP on [x_s; x_g]: the actor pi(a | s, g), or td's V(s, g); its first layer split."""

    def __init__(self, features, hidden, outputs=4):
        super().__init__()
        self.s_in = nn.Linear(features, hidden)  # W_s, b
        self.g_in = nn.Linear(features, hidden, bias=False)  # W_g
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, outputs))

    def forward(self, x, s, g):
        """x (N, F) all cells, s, g (B,) -> (B, outputs); W_s x, W_g x once a cell (departure)."""
        return self.body(self.s_in(x).index_select(0, s) + self.g_in(x).index_select(0, g))


def build(env, args, device):
    """Features x (N, F) of the cells (departure: not observations), one-hot or (row, col) in
    [-1, 1]; the critic, phi: F -> k (an MLP, departure; --critic exact: linear, k = N, a table
    on one-hot), td's V, None (gcbc) or BFS's d as a frozen table (--critic bfs); the actor."""
    size = torch.tensor([env.height - 1, env.width - 1], dtype=torch.float32).clamp(min=1)
    x = (torch.eye(len(env.cells)) if args.features == "onehot" else
         2 * torch.tensor(env.cells, dtype=torch.float32) / size - 1).to(device)
    f, h = x.shape[1], args.hidden
    critic = {"metricrl": lambda: nn.Sequential(nn.Linear(f, h), nn.ReLU(), nn.Linear(h, h),
                                                nn.ReLU(), nn.Linear(h, args.latent)),
              "bfs": lambda: nn.Embedding.from_pretrained(torch.tensor(env.distance_matrix(),
                                                                       dtype=torch.float32)),
              "exact": lambda: nn.Linear(f, len(x) + args.super_state, bias=False),  # k = N
              "td": lambda: PairNet(f, h, 1), "gcbc": lambda: None}[
        args.algo if args.critic == "paper" else args.critic]()
    return x, None if critic is None else critic.to(device), PairNet(f, h).to(device)


# =========================================================== 2. critic (paper Sec. 3)
def push(d, shape, eps=1e-6):
    """The negative term at latent distance d: -log d (the paper's), 1/d or -d."""
    if shape == "log":
        return -torch.log(d + eps)
    return 1 / (d + eps) if shape == "inverse" else -d


def metric_loss(d_pos, n_pos, d_neg, n_neg, args, mu=None):
    """The critic's loss (Sec. 3) over pairs of states, each counted n times:
      positive = mean over moves s -> s'                     (d_phi(s, s') - 1)^2
      negative = mean over other pairs (s_i, s'_j), i != j   -log d_phi(s_i, s'_j)
      loss     = positive + lambda * negative
    --objective constrained (QRL, Wang et al. 2023) pushes every pair of the data apart
    subject to d_phi(s -> s') <= 1, mu a Lagrange multiplier:
      loss     = -mean d_phi(s_i, s'_j) + mu * mean relu(d_phi(s, s') - 1)^2"""
    mean = lambda v, n: (n * v).sum() / n.sum().clamp(min=1)  # noqa: E731
    if args.objective == "constrained":
        spread, violation = mean(d_neg, n_neg + n_pos), mean((d_pos - 1).relu() ** 2, n_pos)
        return -spread + mu * violation, {"push": spread, "violation": violation}
    positive = mean((d_pos - 1) ** 2, n_pos)
    negative = mean(push(d_neg, args.negative), n_neg)
    return positive + args.lam * negative, {"positive": positive, "negative": negative}


def exact_loss(z, counts, mu):
    """--critic exact, z (N, k = N): a coordinate per cell, d_phi = max_c relu(z_c(s) - z_c(g)),
    each pair of the data pushed on its goal's coordinate, each coordinate held on each move:
      loss = -mean_(s, g) min(z_g(s) - z_g(g), N)
             + mu * mean_(s -> s', c) relu(z_c(s) - z_c(s') - 1)^2
    A linear program per coordinate g, whose optimum z_g(s) - z_g(g) is d(s, g); then d_phi is
    d too (Frechet's embedding, README). It reads the data's moves only, never BFS."""
    (u, v), n = counts[0].nonzero().T, counts[0] + counts[1]  # moves u -> v (E,), pairs (N, N)
    push = ((z - z.diagonal()).clamp(max=len(z)) * n).sum() / n.sum().clamp(min=1)
    violation = ((z[u] - z[v] - 1).relu() ** 2).sum() / max(1, u.numel() * z.shape[1])  # (E, k)
    return -push + mu * violation, {"push": push, "violation": violation}


def batch_pairs(z, z2, s, s2, metric):
    """B transitions as metric_loss's pairs, z, z2 = phi(s), phi(s') (B, k): positive row-wise,
    (B,) (departure: theirs is B x B), negative (B, B); s' = s, s_i = s'_j count 0 (departure)"""
    eye = torch.eye(len(s), dtype=torch.bool, device=s.device)
    return (latent_distance(z, z2, metric), (s != s2).float(),
            pairwise(z, z2, metric), ((s[:, None] != s2[None, :]) & ~eye).float())


def pair_counts(data, n):
    """The whole dataset as one batch, per pair of cells u != v (departure): moves u -> v
    (N, N) and pairs (s_i, s'_j) = (u, v), i != j (N, N)."""
    c, c2 = (torch.bincount(data[k], minlength=n).float() for k in ("s", "s2"))
    e = torch.bincount(data["s"] * n + data["s2"], minlength=n * n).float().view(n, n)
    return e.fill_diagonal_(0), (c[:, None] * c2[None, :] - e).fill_diagonal_(0)  # u != v


def with_super_state(data, args, n):
    """--super-state (Sec. 3.4): every trajectory's end moves to one virtual state, index n."""
    last = data["s2"][-(len(data["s"]) // args.episode_len):]  # (E,) the last block: t = T - 1
    return {"s": torch.cat([data["s"], last]), "a": torch.cat([data["a"], 0 * last]),
            "s2": torch.cat([data["s2"], torch.full_like(last, n)])}


def embed(critic, x, args):
    """phi of every cell, (N, k); with --super-state one more row, all-zero features."""
    return critic(torch.cat([x, x.new_zeros(1, x.shape[1])]) if args.super_state else x)


# ======================================= 3. value (Sec. 3.1) and advantage (Sec. 3.3)
def latent_distance(z, zg, metric="euclidean"):
    """d_phi(s, g), row-wise: (..., k), (..., k) -> (...). euclidean: the paper's; quasimetric
    (Liu et al. 2023): Euclidean on half the coordinates + max-relu; "max-relu": max_i relu(z_i(s)
    - z_i(g)) alone (--critic exact)."""
    if metric == "euclidean":
        return (z - zg).norm(dim=-1)
    h = z.shape[-1] // 2 if metric == "quasimetric" else 0
    return (z[..., :h] - zg[..., :h]).norm(dim=-1) + (z[..., h:] - zg[..., h:]).relu().amax(-1)


def pairwise(z, z2, metric="euclidean"):
    """All pairs: (N, k), (M, k) -> (N, M), [i, j] = d_phi(z_i, z2_j), in chunks of rows."""
    if metric == "euclidean":
        return torch.cdist(z, z2)
    return torch.cat([latent_distance(c[:, None], z2[None], metric)
                      for c in z.split(max(1, 2**24 // z2.numel()))])


def value(d, gamma):
    """V(s, g) = gamma^{d_phi(s, g)} * r_g with r_g = 1 (Sec. 3.1)."""
    return gamma ** d


def advantage_weights(d, d2, args):
    """w from d = d_phi(s, g), d2 = d_phi(s', g), (B,): A = d - d2 = log_gamma V(s, g)/V(s', g), in
    steps (departure); exp: min(exp(beta A), w_max) (departure); linear: A (the authors' code).
    A clip that binds often ties the best moves, and then the data's counts choose (README)."""
    adv = d - d2  # (B,)
    return adv if args.weighting == "linear" else torch.exp(args.beta * adv).clamp(max=args.w_max)


# ================================================================ 4. actor (Sec. 3.3)
def actor_loss(logits, a, w):
    """Advantage-weighted imitation: -mean_i w_i log pi(a_i | s_i, g_i); w has no gradient."""
    logp = torch.log_softmax(logits, dim=-1).gather(1, a[:, None]).squeeze(1)  # (B,)
    return -(w * logp).mean()


def balance(data):
    """For goals "uniform": the data's cells (C,) and each transition's weight (M,), so that s is
    a uniform cell, a a uniform action of the data at s, then one of its transitions s, a -> s'."""
    edge = 4 * data["s"] + data["a"]  # (M,) the move (s, a)
    actions = torch.bincount(torch.unique(edge) // 4)  # (N,) distinct actions at each cell
    return {"cells": actions.nonzero()[:, 0],  # the cells the data leaves from
            "weight": 1 / (torch.bincount(edge)[edge] * actions[data["s"]])}


def sample(data, n, goals, args):
    """n transitions with goals, s, a, s2, g (n,); goals: uniform (balance(); departure), random
    (the paper's: dataset states), hindsight (a later s' of the trajectory, GCBC's), mixed (td's)"""
    m, dev = len(data["s"]), data["s"].device
    i = (torch.multinomial(data["weight"], n, replacement=True) if goals == "uniform" else
         torch.randint(m, (n,), device=dev))  # (n,) transitions, weighted by balance()
    s, a, s2, g = data["s"][i], data["a"][i], data["s2"][i], None
    if goals == "uniform":
        g = data["cells"][torch.randint(len(data["cells"]), (n,), device=dev)]
    elif goals == "random":
        g = data["s"][torch.randint(m, (n,), device=dev)]
    elif goals in ("hindsight", "mixed"):
        t = data["t"][i]
        later = t + (torch.rand(n, device=dev) * (args.episode_len - t)).long()  # [t, T)
        g = data["s2"][later * (m // args.episode_len) + data["episode"][i]]  # (e, t') at t' E + e
        if goals == "mixed":
            other = data["s"][torch.randint(m, (n,), device=dev)]
            g = torch.where(torch.rand(n, device=dev) < 0.5, g, other)
    return s, a, s2, g


# ========================= 5. baselines: the same data and actor, another critic or none
TARGET_RATE = 0.5  # td: V_target moves this share of the way to V after each step (tuned)
DUAL_RATE = 10.0  # --objective constrained: mu grows by this times the mean violation
EXACT_DUAL, CRITIC_ADAM = 1e4, {"exact": {"lr": 0.2, "betas": (0.5, 0.9)}}  # measured: README


def td_loss(v, v_target, x, s, s2, g, args):
    """td, the critic MetricRL replaces, s, s2, g (B,) (gcbc has none: every weight is 1):
      y    = gamma * (1 if s' = g else V_target(s', g))     so V* = gamma^d, as in MetricRL
      loss = mean |tau - 1(y < V(s, g))| (y - V(s, g))^2     expectile regression (IQL)"""
    with torch.no_grad():
        y = args.gamma * torch.where(s2 == g, 1.0, v_target(x, s2, g)[:, 0])  # (B,)
    u = y - v(x, s, g)[:, 0]  # (B,)
    keep = (s != g).float()  # V(g, g) = 1 is not learned
    tau = torch.where(u < 0, 1 - args.expectile, args.expectile)
    return (keep * tau * u ** 2).sum() / keep.sum().clamp(min=1)


# ========================================================== 6. training (Algorithm 1)
def critic_step(critic, x, data, counts, args, memory):
    """A critic step: loss, info, dist(s, g) (B,) for the actor or None; memory: V_target, mu."""
    if args.algo == "gcbc" or args.critic == "bfs":
        return torch.zeros((), device=x.device), {}, None if critic is None else (
            lambda s, g: critic.weight[s, g])
    if args.algo == "td":
        with torch.no_grad():  # V_target moves TARGET_RATE of the way to V after each step
            for p_target, p in zip(memory["target"].parameters(), critic.parameters()):
                p_target.lerp_(p, TARGET_RATE)
        s, _, s2, g = sample(data, args.actor_batch, "mixed", args)  # (B_actor,)
        loss = td_loss(critic, memory["target"], x, s, s2, g, args)
        return loss, {"td_loss": loss, "critic_loss": loss}, lambda s, g: torch.log(
            critic(x, s, g)[:, 0].clamp(1e-6, 1)) / math.log(args.gamma)  # log_gamma V
    z = embed(critic, x, args)  # (N, k): phi of every cell once, a batch gathers rows (departure)
    if args.critic == "exact":
        loss, info = exact_loss(z, counts, memory["mu"])
    elif args.batch_size > 0:
        s, _, s2, _ = sample(data, args.batch_size, None, args)  # (B,)
        loss, info = metric_loss(*batch_pairs(z[s], z[s2], s, s2, args.metric), args, memory["mu"])
    else:
        d = pairwise(z, z, args.metric)  # (N, N)
        loss, info = metric_loss(d, counts[0], d, counts[1], args, memory["mu"])
    if "violation" in info:  # the constrained objectives: mu rises with the violation
        rate, most = (EXACT_DUAL, 1e6) if args.critic == "exact" else (DUAL_RATE, 1e4)
        memory["mu"] = (memory["mu"] + rate * info["violation"].detach()).clamp(max=most)
    zd, metric = z.detach(), "max-relu" if args.critic == "exact" else args.metric
    return loss, {**info, "critic_loss": loss}, lambda s, g: latent_distance(zd[s], zd[g], metric)


def actor_budget(n):
    """The actor's samples per step grow with the N^2 pairs it must learn (departure)."""
    return max(1024, n * n // 32)


def train(data, x, critic, actor, args, evaluate, log):
    """Algorithm 1: the critic alone for a `critic_only` share of the steps, then both in one
    backward pass (gcbc, --critic bfs: the actor only); log(losses, evaluate()) every eval_every
    steps, log(losses) after 30 s without one."""
    opt = torch.optim.Adam([{"params": critic.parameters() if critic else [], **CRITIC_ADAM.get(
        args.critic, {})}, {"params": actor.parameters()}], lr=args.lr, fused=True)
    actor_from = 0 if critic is None or args.critic == "bfs" else int(args.critic_only * args.steps)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, [  # the actor's lr falls to 0 (departure),
        lambda k: 1 - k / args.steps if args.critic == "exact" else 1.0,  # and exact's critic's
        lambda k: min(1.0, (args.steps - k) / max(1, args.steps - actor_from))])
    memory = {"target": copy.deepcopy(critic) if args.algo == "td" else None,
              "mu": torch.ones((), device=x.device)}
    goals = {"auto": "hindsight" if args.algo == "gcbc" else "uniform"}.get(args.goals, args.goals)
    data = {**data, **balance(data)}
    args = dataclasses.replace(args, actor_batch=args.actor_batch or actor_budget(len(x)))
    cdata = with_super_state(data, args, len(x)) if args.super_state else data
    counts = pair_counts(cdata, len(x) + args.super_state)
    sums, tick, last = {}, time.time(), 0
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
        for k, v in info.items():  # summed on the device: no host sync per step
            sums[k] = (sums.get(k, (0, 0))[0] + v.detach(), sums.get(k, (0, 0))[1] + 1)
        scored = step % args.eval_every == 0 or step == args.steps
        if scored or time.time() - tick > 30:  # a progress line at least every 30 s
            row = {"step": step, **{k: v.item() / n for k, (v, n) in sums.items()},
                   "steps_per_s": (step - last) / max(time.time() - tick, 1e-6)}
            if bad := [k for k in sums if not math.isfinite(row[k])]:
                raise FloatingPointError(f"training diverged: at step {step} the {bad[0]} is "
                                         f"{row[bad[0]]}; try a smaller --lr")
            log({**row, **(evaluate() if scored else {})})
            sums, tick, last = {}, time.time(), step


# ========================================================= 7. evaluation (exact, BFS)
METRICS = ("success_rate", "path_ratio", "optimal_action_rate", "value_greedy_rate",
           "critic_success_rate", "spearman", "monotonicity", "distance_error",
           "distance_error_max")


def ground_truth(env, device):
    """The BFS truth as tensors: nxt (N, 4), d (N, N), opt (N, N, 4)."""
    return {k: torch.as_tensor(np.array(f()), device=device) for k, f in (
        ("nxt", env.transitions), ("d", env.distance_matrix), ("opt", env.optimal_actions))}


@torch.no_grad()
def pair_table(net, x, chunk=1 << 16):
    """A PairNet on every pair (s, g), in chunks: (N, N, outputs)."""
    n = len(x)
    return torch.cat([net(x, p // n, p % n) for p in torch.arange(
        n * n, device=x.device).split(chunk)]).view(n, n, -1)


@torch.no_grad()
def critic_distances(critic, x, args):
    """The critic's distances, (N, N): d_phi, log_gamma V (td), or None (gcbc)."""
    if args.critic == "bfs":
        return critic.weight
    if args.algo == "metricrl":
        z = embed(critic, x, args)[:len(x)]  # (N, k), without the super-state
        return pairwise(z, z, "max-relu" if args.critic == "exact" else args.metric)
    if args.algo == "td":
        return torch.log(pair_table(critic, x)[..., 0].clamp(1e-6, 1)) / math.log(args.gamma)


def rollout(table, nxt, limit, slip=0.0, seed=0):
    """All pairs (s, g) at once, by look-ups in the action table (N, N) -> reached, steps (N, N);
    back at the cell saved at step 1, 2, 4, ..., a pair loops (Brent): it stops. Seeded slips."""
    gen, n = torch.Generator(device=table.device).manual_seed(seed), len(table)
    pair = torch.arange(n * n, device=table.device)
    pos, goal = pair // n, pair % n  # (P,) flat pairs, P = N^2
    steps, saved = torch.zeros_like(pair), pos.clone()
    live = pair[pos != goal]  # (L,) pairs on their way
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


def spearman(x, y):
    """Spearman rank correlation: Pearson correlation of the ranks (ties: their mean rank)."""
    r = [(c.cumsum(0) - (c - 1) / 2)[i].double() for _, i, c in (
        torch.unique(v, return_inverse=True, return_counts=True) for v in (x, y))]
    r = [v - v.mean() for v in r]
    return ((r[0] * r[1]).sum() / (r[0].norm() * r[1].norm())).item()


def monotonicity(dz, d, triplets=200_000, seed=0):
    """Sec. 3.1: the share of seeded triplets with d(s1, g) < d(s2, g) whose order d_phi keeps."""
    gen = torch.Generator().manual_seed(seed)
    s1, s2, g = torch.randint(len(d), (3, triplets), generator=gen).to(d.device)
    d1, d2 = d[s1, g], d[s2, g]
    keep = (d1 >= 0) & (d2 >= 0) & (d1 != d2)
    near, far = torch.where(d1 < d2, s1, s2)[keep], torch.where(d1 < d2, s2, s1)[keep]
    return (dz[near, g[keep]] < dz[far, g[keep]]).double().mean().item()


@torch.no_grad()
def evaluate(dz, actor, x, truth, slip=0.0, limit=LIMIT):
    """Every metric over all reachable pairs s != g, against the BFS truth, of the actor's greedy
    table and of its critic's, argmin_a d_phi(next(s, a), g), from dz (N, N) (None: nan)."""
    nxt, d, opt = truth["nxt"], truth["d"], truth["opt"]
    pairs = d > 0  # (N, N) reachable, s != g
    pi = pair_table(actor, x).argmax(-1)  # (N, N) the greedy policy
    reached, steps = rollout(pi, nxt, limit, slip=slip)
    ok = reached & pairs
    on_path = lambda table: (  # noqa: E731  (the share of pairs whose action is optimal)
        opt.gather(2, table[..., None])[..., 0][pairs].double().mean().item())
    metrics = {"success_rate": ok[pairs].double().mean().item(),
               "path_ratio": (steps[ok] / d[ok]).mean().item() if ok.any() else math.nan,
               "optimal_action_rate": on_path(pi)}
    if dz is None:
        return {**metrics, **{k: math.nan for k in METRICS[3:]}}
    greedy = dz[nxt].argmin(dim=1)  # (N, N): dz[nxt] is (N, 4, N)
    error = (dz[pairs] - d[pairs]).abs()  # |d_phi(s, g) - d(s, g)|, exact: 0
    return {**metrics, "value_greedy_rate": on_path(greedy),
            "critic_success_rate": rollout(greedy, nxt, limit, slip=slip)[0][pairs]
            .double().mean().item(), "spearman": spearman(dz[pairs], d[pairs].double()),
            "monotonicity": monotonicity(dz, d), "distance_error": error.mean().item(),
            "distance_error_max": error.max().item()}


# ============ THE TOOLING: a run end to end, its figure and files, the command line, sweeps
class UsageError(Exception):
    """Bad input: one line on stderr, exit code 2."""


def say(*lines):
    """print, and keep running when stdout is closed (python metricrl.py | head -1)."""
    with contextlib.suppress(BrokenPipeError):
        return print(*lines, sep="\n", flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # later prints go nowhere


def run(args):
    """One run, Algorithm 1: data -> critic and actor (or --load's) -> exact evaluation -> files."""
    start, (env, args, device, agent) = time.time(), setup(args)  # --load: the checkpoint's flags
    out = args.out or (os.path.dirname(args.load) or "." if args.load else
                       os.path.join("runs", run_name(args)))
    with staged(out, ("metrics.json", "log.csv", "model.pt", "metricrl.png")) as tmp:
        torch.manual_seed(args.seed)
        data = {k: v.to(device) for k, v in
                collect_dataset(env, args, np.random.default_rng(args.seed)).items()}
        truth, n = ground_truth(env, device), len(env.cells)
        cover = {"transitions": len(data["s"]), "cell_coverage": len(torch.unique(torch.cat(
            [data["s"], data["s2"]]))) / n, "edge_coverage": len(torch.unique(4 * data["s"] +
                                                                             data["a"])) / (4 * n)}
        x, critic, actor, history = (agent.x, agent.critic, agent.actor, agent.history) if (
            agent) else (*build(env, args, device), [])
        score = lambda: evaluate(  # noqa: E731  (every metric, now)
            critic_distances(critic, x, args), actor, x, truth, args.slip)
        if not agent:
            report(f"{args.env}: {n} cells | data {cover} | {device} | {args.steps} steps", args)
            train(data, x, critic, actor, args, score,
                  lambda row: (history.append(row), report(row, args)))
        metrics = {k: v for k, v in (score() if agent else history[-1]).items() if k in METRICS}
        torch.save({"critic": critic.state_dict() if critic else None, "actor": actor.state_dict(),
                    "args": dataclasses.asdict(args), "layout": env.layout, "history": history},
                   os.path.join(tmp, "model.pt"))
        with open(os.path.join(tmp, "log.csv"), "w", newline="", encoding="utf-8") as f:
            keys = list(dict.fromkeys(k for row in history for k in row))  # a header row, rows
            csv.DictWriter(f, keys).writerows([dict(zip(keys, keys)), *history])
        plot_run(os.path.join(tmp, "metricrl.png"), env, args, x, critic, actor, data, truth,
                 history, metrics)
        metrics.update(env=args.env, algo=args.algo, run=run_name(args), seed=args.seed,
                       device=str(device), steps=args.steps, seconds=round(time.time() - start, 2),
                       train_steps_per_s=float(np.median([h["steps_per_s"] for h in history])),
                       dataset=cover, flags=dataclasses.asdict(args))
        with open(os.path.join(tmp, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    report(f"wrote {os.path.join(out, '')} (metrics.json, log.csv, model.pt, metricrl.png) in "
           f"{metrics['seconds']:.1f} s\n" +
           "\n".join(f"  {k:20s} {metrics[k]:.3f}" for k in METRICS if k in metrics), args)
    return metrics


def report(row, args):
    """Text, or one progress line: losses, speed, exact metrics (if evaluated), time left."""
    if args.quiet or isinstance(row, str):
        return args.quiet or say(row)
    text = [f"step {row['step']:6d}/{args.steps}", *(f"{k[:-5]} {row[k]:7.3f}" for k in (
        "critic_loss", "actor_loss") if k in row), f"{row['steps_per_s']:5.0f} steps/s |", *(
        f"{k} {row[m]:.3f}" for k, m in (("success", "success_rate"), ("critic success",
        "critic_success_rate"), ("|d_phi - d|", "distance_error"), ("max", "distance_error_max"))
        if not math.isnan(row.get(m, math.nan)))]
    left = (args.steps - row["step"]) / row["steps_per_s"] / 60
    say("  ".join(text).rstrip(" |") + f" | about {left:.1f} min left" * (left > 1))


# ---------------------------------------------------------------------------- figures
def show_map(fig, ax, env, values, title, cmap="viridis", label="", **kw):
    """Values per cell (N,) on the map, with a colorbar (values None: a blank panel, `title`)."""
    if values is None:
        ax.text(0.5, 0.5, title, ha="center", va="center", transform=ax.transAxes, fontsize=12)
        return ax.set_axis_off()
    image = np.full((env.height, env.width), np.nan)
    image[env.cells[:, 0], env.cells[:, 1]] = values
    fig.colorbar(ax.imshow(np.ma.masked_invalid(image), cmap=cmap, **kw), ax=ax, fraction=0.046,
                 pad=0.03, label=label)
    ax.set(title=title, xticks=[], yticks=[], facecolor="0.25")  # masked cells show it


@torch.no_grad()
def plot_run(path, env, args, x, critic, actor, data, truth, history, metrics):
    """The run's figure: for one far goal g, value, policy and data on the map; plot_learning's."""
    d = env.distance_matrix()
    goal = int(np.argmax(d.max(0)))  # the hardest goal: farthest from some cell
    to_goal = np.where(d[:, goal] >= 0, d[:, goal], np.nan)  # (N,), nan: g out of reach
    dz = critic_distances(critic, x, args)
    dz = None if dz is None else dz.cpu().numpy()  # (N, N)
    table = pair_table(actor, x).argmax(-1)  # (N, N) the greedy policy
    fails = ~rollout(table, truth["nxt"], len(x))[0][:, goal].cpu().numpy() & (to_goal > 0)
    v, v_true = None if dz is None else value(dz[:, goal], args.gamma), value(to_goal, args.gamma)
    low = np.nanmin(v_true if v is None else [*v_true, *v])  # one colour scale for both
    fig = Figure(figsize=(20, 9.5))
    top, bottom = fig.subplots(2, 4)
    for ax, values, title, cmap, label, kw in (
            (top[0], v, f"{args.algo} has no critic" if v is None else "--critic bfs: the true V"
             if args.critic == "bfs" else r"Learned $V(s, g) = \gamma^{d_\phi(s, g)}$" if
             args.algo == "metricrl" else "Learned V(s, g), by TD",
             "viridis", "V", {"vmin": low, "vmax": 1}),
            (top[1], v_true, r"True optimal $V^*(s, g) = \gamma^{d(s, g)}$", "viridis", "V*",
             {"vmin": low, "vmax": 1}),
            (top[2], to_goal, f"Greedy π(·|s, g): {fails.sum()} of {(to_goal > 0).sum()} cells "
             f"fail (×)" + ", without slips" * (args.slip > 0), "Blues_r", "true distance to g",
             {}), (top[3], np.bincount(data["s"].cpu().numpy(), minlength=len(x)),
                   f"Offline data: visits per cell (ε = {args.epsilon})", "magma", "visits", {})):
        show_map(fig, ax, env, values, title, cmap, label, **kw)
        if values is not None:
            ax.plot(*env.cells[goal][::-1], "*", color="white", ms=18, mec="k", label="goal g")
            for r, c in np.argwhere(np.isin(env.grid, list(gridworld.ONE_WAY))):  # their arrow
                ax.text(c, r, env.grid[r, c], ha="center", va="center", color="red", weight="bold")
    move = gridworld.MOVES[table[:, goal].cpu().numpy()]  # (N, 2) each cell's move
    small = 15 / max(env.height, env.width, 15)  # marks shrink on large maps
    top[2].quiver(env.cells[:, 1], env.cells[:, 0], move[:, 1], move[:, 0], angles="xy",
                  scale_units="xy", scale=1.6, width=0.006 * small, color="k")
    top[2].plot(*env.cells[fails].T[::-1], "x", color="red", ms=9 * small, mew=2 * small)
    z = embed(critic, x, args)[:len(x)].cpu().numpy() if args.algo == "metricrl" and (
        args.critic != "bfs") else None
    plot_learning(fig, bottom, env, args, d, dz, z, goal, to_goal, history)
    critic = "" if dz is None else (f", critic success {metrics['critic_success_rate']:.3f}, "
                                    f"monotonicity {metrics['monotonicity']:.3f}")
    fig.suptitle(f"{run_name(args)} ({len(x)} cells, {len(data['s'])} transitions of data, ε = "
                 f"{args.epsilon}). Over all pairs: success {metrics['success_rate']:.3f}{critic}. "
                 f"Top row: one far goal g = {tuple(env.cells[goal].tolist())}", size=13)
    fig.subplots_adjust(left=0.035, right=0.965, bottom=0.07, top=0.92, wspace=0.32, hspace=0.22)
    fig.savefig(path, dpi=70)


def plot_learning(fig, axes, env, args, d, dz, z, goal, to_goal, history):
    """Metrics, losses in training; learned vs true distance; phi (N, k) on 2 principal axes."""
    a_d, a_z, a_metrics, a_loss = axes
    for ax, keys in ((a_metrics, ("success_rate", "critic_success_rate", "optimal_action_rate",
                                  "monotonicity")), (a_loss, ("positive", "negative", "td_loss",
                                                              "push", "violation", "actor_loss"))):
        for key in keys:
            rows = [h for h in history if not math.isnan(h.get(key, math.nan))]
            if rows:
                ax.plot([h["step"] for h in rows], [h[key] for h in rows], "o-", ms=3, label=key)
    if args.algo != "gcbc" and args.critic != "bfs":
        a_metrics.axvline(args.critic_only * args.steps, color="0.5", ls=":", label="actor starts")
    a_metrics.set(title="Exact metrics during training", xlabel="gradient step", ylim=(0, 1.02))
    a_loss.set(title="Losses (mean since the last point)", xlabel="gradient step")
    a_metrics.legend(fontsize=8), a_loss.legend(fontsize=8)
    if dz is None:
        show_map(fig, a_z, env, None, "no embedding φ")
        return show_map(fig, a_d, env, None, f"{args.algo} has no critic")
    true, learned = d[d > 0], dz[d > 0]
    dist = np.arange(1, true.max() + 1)  # every true distance
    q = np.array([np.percentile(learned[true == t], [10, 50, 90]) for t in dist])
    a_d.fill_between(dist, q[:, 0], q[:, 2], alpha=0.3, label="10–90% of pairs")
    a_d.plot(dist, q[:, 1], label="median")
    a_d.plot(dist, dist, "k--", lw=1, label="learned = true")
    a_d.set(title=f"Learned vs true distance (mean |error| {abs(learned - true).mean():.2f})",
            xlabel="true distance d(s, g) (BFS)", ylabel="BFS d(s, g), the oracle" if args.critic ==
            "bfs" else "learned " + ("log_γ V(s, g)" if args.algo == "td" else "d_φ(s, g)"))
    a_d.legend()
    if z is None:
        return show_map(fig, a_z, env, None, "no embedding φ")
    centred = z - z.mean(0)
    xy = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T  # (N, 2) PCA
    i, j = np.repeat(np.arange(len(z)), 4), env.transitions().ravel()  # all moves
    edges = np.unique(np.sort(np.stack([i, j], 1)[i != j], 1), axis=0).T  # (2, E), each once
    a_z.plot(xy[edges, 0], xy[edges, 1], color="0.8", lw=0.8, zorder=0)
    fig.colorbar(a_z.scatter(*xy.T, c=to_goal, s=18, plotnonfinite=True), ax=a_z, fraction=0.046,
                 pad=0.03, label="true distance to g")
    a_z.plot(*xy[goal], "*", color="white", ms=18, mec="k")
    a_z.set(title="φ(s) on 2 principal axes (lines: moves)", xlabel="PC 1", ylabel="PC 2")


# ---------------------------------------------------------------- files and checkpoints
@contextlib.contextmanager
def staged(out, names):
    """Write `names` in a new folder in `out`, then move them in: a failed run changes nothing."""
    try:
        os.makedirs(tmp := os.path.join(out, f".partial-{os.getpid()}-{time.time_ns()}"))
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror})") from None
    try:
        yield tmp
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Agent:
    """A trained policy, Agent(model.pt, device): act(states, goals) with (B, 2) or (2,) int
    (row, col) -> (B,) greedy actions; its env, args, networks, history."""

    def __init__(self, path, device="cpu"):
        ckpt = dict(torch.load(path, map_location=device, weights_only=True))
        self.args = Args(**{k: v for k, v in ckpt["args"].items() if k in Args.__annotations__})
        self.history, self.env = ckpt["history"], gridworld.GridWorld(ckpt["layout"])
        self.x, self.critic, self.actor = build(self.env, self.args, device)
        for net, state in ((self.critic, ckpt["critic"]), (self.actor, ckpt["actor"])):
            if net is not None:
                net.load_state_dict(state)

    @torch.no_grad()
    def act(self, states, goals):
        s, g = (torch.as_tensor(np.atleast_1d(self.env.cell_indices(c)), device=self.x.device)
                for c in (states, goals))
        return self.actor(self.x, *torch.broadcast_tensors(s, g)).argmax(-1).cpu().numpy()


# --------------------------------------------------------------------- the command line
def parse_args(argv=None):
    """argparse from Args, a flag per knob, its comment as --help: (Args, the flags given)."""
    helps = dict(re.findall(r"^    (\w+): .+  # (.+)$", inspect.getsource(Args), re.M))
    parser = argparse.ArgumentParser("metricrl.py", description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS)
    parser.print_usage = lambda file=None: None  # a bad flag: one line, exit 2, no usage dump
    for f in dataclasses.fields(Args):  # a bool knob is a switch
        kind = type(f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), help=helps[f.name] + f" (default: "
                            f"{f.default})" * (kind is not bool and f.default != ""), **(
            {"action": "store_true"} if kind is bool else
            {"type": kind, "choices": typing.get_args(f.type) or None}))
    given = vars(parser.parse_args(argv))
    return Args(**given), set(given)


def check_args(args, given=frozenset()):
    """Raise UsageError for a value or a combination of flags that a run cannot use."""
    ints, floats = (" ".join(f.name for f in dataclasses.fields(Args) if type(f.default) is kind)
                    for kind in (int, float))
    for names, ok, what in [  # nan fails every test
            ("steps episode_len eval_every hidden lr w_max seeds", lambda v: v > 0, "positive"),
            ("seed episodes batch_size actor_batch lam beta", lambda v: v >= 0, "0 or more"),
            ("latent", lambda v: v >= 2, "2 or more (the figure projects phi on 2 axes)"),
            ("epsilon slip", lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("critic_only", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("gamma", lambda v: 0 < v <= 1, "in (0, 1]"),
            ("expectile", lambda v: 0 < v < 1, "in (0, 1)"),
            (ints, lambda v: v < 2**31, "below 2^31"), (floats, math.isfinite, "finite")]:
        for name in names.split():
            if not ok(v := getattr(args, name)):
                raise UsageError(f"--{name.replace('_', '-')} must be {what}, got {v!r}")
    one, two, *_ = [m for m in ("compare", "assumptions", "load") if getattr(args, m)] + ["", ""]
    ignored = min((given - {"load", "out", "device", "quiet"}) if args.load else given & set(
        SWEEPS.get(one, ((), (), ()))[2]) - {"env" if one == "compare" else ""}, default="")
    for bad, message in (
            (two == "load", f"--{one} trains its own runs: drop --load"),
            (two, f"--{one} and --{two} are two modes: use one"),
            (ignored, f"--{ignored.replace('_', '-')}: " + ("--load runs a checkpoint with "
             "the flags it was trained with" if args.load else f"--{one} sets it in each row")),
            (args.algo == "td" and args.gamma == 1, "td (--algo td, or in --algos) needs --gamma "
             "below 1 (its distance is log_gamma V)"),
            (args.algo != "metricrl" and (args.super_state, args.objective, args.metric,
             args.critic) != (False, "paper", "euclidean", "paper"), "--super-state, --objective, "
             "--metric and --critic are MetricRL's: use --algo metricrl"),
            (args.critic == "exact" and any(getattr(args, k) != getattr(Args, k) for k in (
             "metric", "objective", "latent", "lam", "negative")), "--critic exact has its own "
             "geometry (k = N) and loss: drop --metric, --objective, --latent, --lam, --negative"),
            (args.batch_size > 0 and (args.objective == "constrained" or args.critic == "exact"),
             "--objective constrained and --critic exact use all the data: --batch-size 0")):
        if bad:
            raise UsageError(message)


def setup(args):
    """The device, --load's checkpoint and the map, once the run's memory fits (an estimate)."""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device not in ("auto", "cpu", *(f"cuda:{i}" for i in range(cuda)), *["cuda"][:cuda]):
        raise UsageError(f"--device {args.device}: here auto, cpu" + (
            f" or cuda:0 to cuda:{cuda - 1}" if cuda else f" (CUDA is not available, torch "
                                                           f"{torch.__version__})"))
    device = torch.device(args.device.replace("auto", "cuda" if cuda else "cpu"))
    try:
        agent = Agent(args.load, device) if args.load else None
    except Exception as e:  # a missing, empty, truncated or foreign file: its first sentence
        why = f"{type(e).__name__}: " + (" ".join(str(e).split()).split(". ")[0] or "empty")
        raise UsageError(f"--load {args.load}: not a metricrl checkpoint ({why[:150]})") from None
    if agent:  # its own flags, this run's output flags
        args = dataclasses.replace(agent.args, load=args.load, out=args.out, device=args.device,
                                   quiet=args.quiet)
    try:
        env = agent.env if agent else gridworld.GridWorld(args.env)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--env: {e}") from None
    n, h, b = len(env.cells), args.hidden, args.actor_batch or actor_budget(len(env.cells))
    need = 250 * n * n + 100 * args.episode_len * (args.episodes or 200 * math.ceil(n / 128)) + (
        16 * (5 * n * h + 3 * h * h) + 32 * (b * h + args.batch_size ** 2))  # bytes
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if os.name == "posix" else 0
    if need > 0.8 * have > 0:
        raise UsageError(f"--env {args.env} with these flags needs about {need / 2**30:.1f} GB "
                         f"of memory; this machine has {have / 2**30:.1f} GB")
    if not (env.distance_matrix() > 0).any():
        raise UsageError(f"--env {args.env}: no free cell can reach another one")
    return env, args, device, agent


def run_name(args, base=None):
    """A run's folder: map, algo, every knob changed from base (the defaults), seed; e.g.
    runs/maze-gcbc-epsilon=0.5-s0. A changed flag never overwrites an earlier result."""
    changed = [(f.name.replace("_", "-"), getattr(args, f.name)) for f in dataclasses.fields(Args)
               if f.name not in ("env", "algo", "seed", "device", "out", "load", "quiet", *MODES)
               and getattr(args, f.name) != getattr(base or Args(), f.name)]
    return "-".join([os.path.splitext(os.path.basename(args.env))[0], args.algo, *(
        k if v is True else f"{k}={v:g}" if type(v) is float else f"{k}={v}" for k, v in changed),
        f"s{args.seed}"])


# -------------------------------------------------- sweeps: --compare and --assumptions
VARIANTS = {"metricrl": {}, "metricrl-linear": {"weighting": "linear"}, "gcbc": {"algo": "gcbc"},
            "td": {"algo": "td"}, **{f"metricrl-{n}": {"negative": n} for n in NEGATIVES[1:]},
            "metricrl-bfs": {"critic": "bfs"}, "metricrl-exact": {"critic": "exact"}}
ASSUMPTIONS = [  # ((experiment, map, variant), flags)
    *[(("invertible actions", env, name), {"env": env, **flags}) for env in ("oneway", "maze")
      for name, flags in (("euclidean", {}), ("quasimetric", {"metric": "quasimetric"}))],
    *[(("deterministic moves", "maze", f"slip {p:g}"), {"slip": p}) for p in (0, 0.1, 0.3)],
    *[(("connected data", "rooms", name), {"env": "rooms", **flags}) for name, flags in (
        ("all data", {}), ("split", {"data": "split"}),
        ("split + super-state", {"data": "split", "super_state": True}))],
    *[(("the objective", env, name), {"env": env, **flags}) for env in ("maze", "rooms",
      "oneway", "maze25") for name, flags in (("paper's loss", {}), ("constrained", {
          "objective": "constrained", "metric": "quasimetric"}))]]
SWEEPS = {  # name: (label columns, metric columns, the knobs a row sets: defaults if unset)
    "compare": (("env", "method", "ε"), (*METRICS[:3], METRICS[4], METRICS[7], "seconds"),
                ("env", "algo", "weighting", "negative", "critic", "epsilon")),
    "assumptions": (("experiment", "map", "variant"), METRICS[:6], ("env", "algo", "weighting",
                    "negative", "critic", "metric", "objective", "slip", "data", "super_state"))}


def compare_rows(args):
    """--compare's rows ((map, method, epsilon), flags)."""
    listed = {flag: list(dict.fromkeys(v.strip() for v in getattr(args, flag).split(",")
                                       if v.strip())) for flag in MODES[2:5]}
    for value in [v for v in listed["algos"] if v not in VARIANTS] + [""] * (not listed["algos"]):
        raise UsageError(f"--algos: unknown {value!r}; choose from {', '.join(VARIANTS)}")
    epsilons = [float(e) if re.fullmatch(r"\d+\.?\d*|\.\d+", e) else math.nan
                for e in listed["epsilons"]] or [math.nan]
    if not all(0 <= e <= 1 for e in epsilons):  # (nan fails too)
        raise UsageError(f"--epsilons must be numbers in [0, 1], got {args.epsilons!r}")
    for env in listed["envs"] or [args.env]:
        setup(dataclasses.replace(args, env=env))  # a bad map fails now, not in an hour
    return [((os.path.splitext(os.path.basename(env))[0], name, f"{eps:g}"),
             {"env": env, **VARIANTS[name], "epsilon": eps}) for env in listed["envs"] or [args.env]
            for name in listed["algos"] for eps in dict.fromkeys(epsilons)]


def sweep(args):
    """--compare or --assumptions: --seeds runs a row, each in a folder (resumable: finished())."""
    name = "compare" if args.compare else "assumptions"
    labels, columns, knobs = SWEEPS[name]
    rows = compare_rows(args) if args.compare else ASSUMPTIONS
    base = dataclasses.replace(args, **{k: getattr(Args(), k) for k in MODES + knobs}, quiet=True)
    root = args.out or os.path.join("runs", "-".join([name, *dict.fromkeys(
        label[0] for label, _ in rows)] if args.compare else [name]))
    cells = [(label, dataclasses.replace(base, **flags, seed=seed)) for label, flags in rows
             for seed in range(args.seed, args.seed + args.seeds)]
    for label, cell in cells:
        check_args(cell)
        cell.out = os.path.join(root, run_name(cell, base))
    say(f"--{name}: {len(cells)} runs in {root}, "
        f"{sum(finished(cell) is not None for _, cell in cells)} done before")
    results = {}
    for k, (label, cell) in enumerate(cells, 1):
        metrics = finished(cell) or dict(run(cell), fresh=True)
        results.setdefault(label, []).append(metrics)
        left = f"about {(len(cells) - k) * metrics['seconds'] / 60:.1f} min left"
        say(f"[{k:3d}/{len(cells)}] {os.path.basename(cell.out):40s} success "
            f"{metrics['success_rate']:.3f}  critic success {metrics['critic_success_rate']:.3f}"
            .replace("nan", "  —") + f"  {metrics['seconds']:5.1f} s | " +
            (left if "fresh" in metrics else "done before"))
    stats = {label: {k: mean_std([r.get(k, math.nan) for r in runs]) for k in (
        *columns, "critic_success_rate")} for label, runs in results.items()}
    cell = lambda c, m, sd: "—" if math.isnan(m) else f"{m:.1f}" if c == "seconds" else (  # noqa
        f"{m:.3f}" + f" ± {sd:.3f}" * (args.seeds > 1))  # E731; seconds: the mean alone
    rows = [f"| {' | '.join([*k, *(cell(c, *stats[k][c]) for c in columns)])} |" for k in stats]
    table = "\n".join([f"Steps {args.steps}, {args.seeds} seed(s)" + ", mean ± std" * (
        args.seeds > 1) + f"; {os.cpu_count()} CPU cores, torch {torch.__version__}, device "
                       f"{metrics['device']}.", "", "| " + " | ".join(labels + columns) + " |",
                       "|---" * len(labels + columns) + "|", *rows])
    with staged(root, (f"{name}.md", f"{name}.png")) as tmp:
        with open(os.path.join(tmp, f"{name}.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        sweep_plot(os.path.join(tmp, f"{name}.png"), name, labels, stats)
    say(table, f"wrote {os.path.join(root, name)}.md and {name}.png")
    return results


def finished(cell):
    """metrics.json of a finished run with the same flags (device and output aside), or None."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError):
        with open(os.path.join(cell.out, "metrics.json"), encoding="utf-8") as f:
            metrics = json.load(f)
        saved = {**dataclasses.asdict(Args()), **metrics["flags"], **{k: getattr(cell, k) for k in (
            "out", "device", "quiet")}}  # knobs added since: their defaults
        if saved == dataclasses.asdict(cell) and metrics["success_rate"] >= 0:
            return metrics


def mean_std(values):
    """Mean and std over seeds, runs without the value (nan) left out."""
    v = np.array([x for x in values if not math.isnan(x)])
    return (v.mean(), v.std()) if len(v) else (math.nan, math.nan)


def sweep_plot(path, name, labels, stats):
    """A bar per row: the actor's success, mean ± std over seeds; a diamond: its critic's own."""
    rows = list(stats)[::-1]  # top to bottom
    i = next((i for i in range(len(rows[0])) if len({r[i] for r in rows}) > 1), 0)
    at = np.arange(len(rows)) + np.cumsum([0] + [a[i] != b[i] for a, b in zip(rows, rows[1:])])
    groups = list(dict.fromkeys(row[i] for row in rows))  # by the first label that varies
    ax = (fig := Figure(figsize=(10, 1.4 + 0.3 * at[-1]), layout="constrained")).subplots()
    ax.barh(at, [stats[r]["success_rate"][0] for r in rows], xerr=[stats[r]["success_rate"][1]
            for r in rows], capsize=3, ecolor="0.5", color=[f"C{groups.index(r[i])}" for r in rows])
    ax.plot([stats[r]["critic_success_rate"][0] for r in rows], at, "kD", ms=6,
            label="its critic's own greedy policy (mean)")
    ax.set_yticks(at, [" · ".join(r) for r in rows], fontsize=8)
    ax.set(xlim=(0, 1.02), xlabel=f"success over all pairs ({' · '.join(labels)})",
           title=f"--{name}: the actor's success (bars: mean ± std over seeds)")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=80)


def main(argv=None):
    """The command line. Exit codes: 2 bad input (one line, no traceback), 1 diverged, 130 ^C."""
    for stream in (sys.stdout, sys.stderr):  # a console that cannot show ε shows \u03b5
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    try:
        args, given = parse_args(argv)
        check_args(args, given)
        return sweep(args) if args.compare or args.assumptions else run(args)
    except (UsageError, FloatingPointError, KeyboardInterrupt) as e:
        code = {UsageError: 2, FloatingPointError: 1}.get(type(e), 130)
        print(f"metricrl.py: error: {e}" + {1: " (nothing was written)", 130: "interrupted: a "
              "run stopped midway writes nothing; the same command resumes a sweep"}.get(code, ""),
              file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()

"""Tests for gridworld.py (the ground truth), metricrl.py (the method, a run, the command line)
and experiments.py (the sweeps). All on CPU, on tiny maps, in the order of the code."""
import copy
import dataclasses
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
import torch.nn as nn
from gymnasium.utils.env_checker import check_env

import experiments
import gridworld
import metricrl
from gridworld import GridWorld, load_layout
from metricrl import Args

HERE = os.path.dirname(os.path.abspath(__file__))

# A 3 x 4 map with an inner wall: its 10 free cells form a ring,
# 0-1-2-3-5-9-8-7-6-4-0 in cell indices (row-major), so d = shorter way round the ring.
RING = "....\n.##.\n...."
RING_DISTANCES = [
    [0, 1, 2, 3, 1, 4, 2, 3, 4, 5],
    [1, 0, 1, 2, 2, 3, 3, 4, 5, 4],
    [2, 1, 0, 1, 3, 2, 4, 5, 4, 3],
    [3, 2, 1, 0, 4, 1, 5, 4, 3, 2],
    [1, 2, 3, 4, 0, 5, 1, 2, 3, 4],
    [4, 3, 2, 1, 5, 0, 4, 3, 2, 1],
    [2, 3, 4, 5, 1, 4, 0, 1, 2, 3],
    [3, 4, 5, 4, 2, 3, 1, 0, 1, 2],
    [4, 5, 4, 3, 3, 2, 2, 1, 0, 1],
    [5, 4, 3, 2, 4, 1, 3, 2, 1, 0],
]
TWO_REGIONS = "..#..\n..#.."
MAZE7 = "#######\n#...#.#\n###.#.#\n#.#...#\n#.#.#.#\n#.....#\n#######"


# ------------------------------------------------------------------ gridworld: truth
def test_bfs_matches_hand_checked_ring():
    env = GridWorld(RING)
    assert env.cells.tolist()[:5] == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]
    assert env.distance_matrix().tolist() == RING_DISTANCES
    assert env.distance_matrix().dtype == np.int32


@pytest.mark.parametrize("layout", ["open", "rooms", "maze", "maze25"])
def test_distances_symmetric_and_neighbours_differ_by_at_most_one(layout):
    env = GridWorld(layout)
    d, nxt = env.distance_matrix(), env.transitions()
    assert (d == d.T).all() and (np.diag(d) == 0).all() and (d >= 0).all()
    assert (np.abs(d[nxt].astype(int) - d[:, None, :]) <= 1).all()  # (N, 4, N)


def test_unreachable_pairs_are_minus_one():
    env = GridWorld(TWO_REGIONS)
    d = env.distance_matrix()
    left = env.cells[:, 1] < 2
    assert (d[left][:, ~left] == -1).all() and (d[~left][:, left] == -1).all()
    assert (d[left][:, left] >= 0).all() and (d[~left][:, ~left] >= 0).all()
    assert not env.optimal_actions()[left][:, ~left].any()


@pytest.mark.parametrize("layout", [RING, "rooms", "maze"])
def test_optimal_actions_are_exactly_the_distance_reducing_ones(layout):
    env = GridWorld(layout)
    d, nxt, opt = env.distance_matrix(), env.transitions(), env.optimal_actions()
    reduces = (np.moveaxis(d[nxt], 1, 2) == d[:, :, None] - 1) & (d[:, :, None] > 0)
    assert (opt == reduces).all()
    n = len(d)
    assert not opt[np.arange(n), np.arange(n)].any()
    # every reachable pair s != g has at least one optimal action
    assert (opt.any(-1) == (d > 0)).all()


def test_transitions_table():
    env = GridWorld(RING)
    nxt = env.transitions()
    assert nxt.shape == (10, 4)
    assert nxt[0].tolist() == [0, 1, 4, 0]  # up: off map; right; down; left: off map
    assert nxt[1].tolist() == [1, 2, 1, 0]  # down is a wall: stay
    assert env.cell_indices((2, 3)) == 9 and env.index[1, 1] == -1


# ---------------------------------------------------------------- gridworld: stepping
def test_step_semantics_wall_bump_goal_and_distance():
    env = GridWorld(RING)
    obs, info = env.reset(seed=0, options={"start": (0, 1), "goal": (0, 3)})
    assert obs["observation"].tolist() == [0, 1] and obs["desired_goal"].tolist() == [0, 3]
    assert obs["observation"].dtype == np.int64 and info["distance"] == 2
    obs, reward, terminated, truncated, info = env.step(2)  # down into the wall
    assert obs["observation"].tolist() == [0, 1] and reward == 0.0 and not terminated
    assert info["distance"] == 2
    obs, reward, terminated, truncated, info = env.step(1)
    assert obs["achieved_goal"].tolist() == [0, 2] and reward == 0.0 and info["distance"] == 1
    obs, reward, terminated, truncated, info = env.step(1)
    assert reward == 1.0 and terminated and not truncated and info["distance"] == 0


def test_reset_draws_connected_distinct_pairs_reproducibly():
    env = GridWorld(TWO_REGIONS)
    pairs = []
    for seed in range(30):
        obs, info = env.reset(seed=seed)
        assert info["distance"] > 0
        pairs.append((tuple(obs["observation"]), tuple(obs["desired_goal"])))
    assert len(set(pairs)) > 5
    again = [env.reset(seed=s)[0]["observation"].tolist() for s in range(30)]
    assert again == [list(p[0]) for p in pairs]


@pytest.mark.parametrize("options, message", [
    ({"start": (1, 1)}, "not a free cell"),          # a wall
    ({"goal": (7, 0)}, "not a free cell"),           # off the map
    ({"start": (0, 0), "goal": (0, 0)}, "not reachable"),
])
def test_reset_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        GridWorld(RING).reset(options=options)


def test_reset_rejects_goal_in_other_region():
    with pytest.raises(ValueError, match="not reachable"):
        GridWorld(TWO_REGIONS).reset(options={"start": (0, 0), "goal": (0, 4)})


def test_check_env_make_and_renders():
    env = gymnasium.make("GridWorld-v0", layout="rooms", render_mode="ansi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any avoidable warning fails the test
        check_env(env.unwrapped)
    assert env.spec.max_episode_steps >= GridWorld("maze51").distance_matrix().max()
    env.reset(seed=0)
    text = env.render()
    assert text.count("A") == 1 and text.count("G") == 1 and len(text.split("\n")) == 13
    image = gymnasium.make("GridWorld-v0", render_mode="rgb_array")
    image.reset(seed=0)
    frame = image.render()
    assert frame.dtype == np.uint8 and frame.shape == (15 * 8, 15 * 8, 3)


def test_image_observations_mark_exactly_the_agents_cell():
    env = gridworld.ImageObservation(gymnasium.make("GridWorld-v0", layout="rooms"), tile=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check_env's note that a wrapper is checked
        check_env(env)
    obs, _ = env.reset(seed=0, options={"start": (1, 1), "goal": (11, 11)})
    assert set(obs) == {"observation", "achieved_goal", "desired_goal"}
    for key, image in obs.items():
        assert image.shape == (13 * 3, 13 * 3, 3) and image.dtype == np.uint8
        assert env.observation_space[key].contains(image)
    agent = (obs["observation"] == gridworld.AGENT).all(-1)  # (H * 3, W * 3) the agent's pixels
    assert agent.sum() == 9 and agent[3:6, 3:6].all()  # exactly one cell, row 1, column 1
    goal = (obs["desired_goal"] == gridworld.AGENT).all(-1)
    assert goal.sum() == 9 and goal[33:36, 33:36].all()  # the agent drawn at the goal
    obs, *_ = env.step(1)  # right
    assert (obs["observation"] == gridworld.AGENT).all(-1)[3:6, 6:9].all()
    every = env.images(np.arange(104))  # one image per cell, the rest of the map alike
    differs = (every != every[:1]).any(-1).sum((1, 2))
    assert every.shape == (104, 39, 39, 3) and differs[0] == 0 and (differs[1:] == 18).all()


@pytest.mark.parametrize("layout, share", [("maze", 0.1), ("rooms", 0.3), (MAZE7, 0.2)])
def test_held_out_cells_leave_the_rest_connected(layout, share):
    env = GridWorld(layout)
    held = env.held_out(share, 0)
    assert held.sum() == round(share * len(env.cells))
    kept = np.flatnonzero(~held)
    d = env.distance_matrix()[np.ix_(kept, kept)]
    assert (d >= 0).all()  # every kept cell reaches every other one (here, through kept cells:
    assert gridworld._connected(env.transitions(), ~held)  # the check that chose them)
    assert (env.held_out(share, 0) == held).all()  # seeded: another seed, other cells
    assert any((env.held_out(share, seed) != held).any() for seed in range(1, 6))
    assert not env.held_out(0.0, 0).any()
    cut = np.zeros(len(env.cells), dtype=bool)
    if layout == "rooms":  # the top-left room's two doorways: that room apart
        cut[env.cell_indices([(3, 6), (6, 2)])] = True
        assert not gridworld._connected(env.transitions(), ~cut)


def test_truncation_through_max_episode_steps():
    env = gymnasium.make("GridWorld-v0", layout="open", max_episode_steps=3)
    env.reset(seed=0, options={"start": (1, 1), "goal": (8, 8)})
    for _ in range(3):
        _, _, terminated, truncated, _ = env.step(0)  # bump the wall
    assert truncated and not terminated


# ---------------------------------------------------------------------- gridworld: maps
def test_generated_maze_is_pinned_connected_and_loopy():
    assert gridworld.generate_maze(7) == MAZE7
    for n in (7, 25):
        env = GridWorld(f"maze{n}")
        assert env.grid.shape == (n, n) and (env.distance_matrix() >= 0).all()
        free, edges = len(env.cells), (env.transitions() != np.arange(len(env.cells))[:, None]).sum() // 2
        assert edges > free - 1  # more edges than a tree: there are loops


def test_generated_maze_is_identical_across_processes():
    code = "import gridworld; print(gridworld.load_layout('maze21'))"
    outs = [subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
            for seed in ("1", "12345")]
    assert outs[0] == outs[1] and outs[0].count("\n") == 21


ONE_WAY_RING = "#####\n#.>.#\n#.#.#\n#...#\n#####"  # 8 cells in a ring, one one-way


def test_directed_bfs_with_a_one_way_cell_by_hand():
    env = GridWorld(ONE_WAY_RING)
    # cells 0 (1,1), 1 (1,2) '>', 2 (1,3), 3 (2,1), 4 (2,3), 5 (3,1), 6 (3,2), 7 (3,3).
    # Around the ring clockwise: 0 1 2 4 7 6 5 3. Cell 1 is left only to the right (2),
    # so counter-clockwise paths cannot pass it: they go the long way round.
    expected = [[0, 1, 2, 1, 3, 2, 3, 4],
                [7, 0, 1, 6, 2, 5, 4, 3],
                [6, 1, 0, 5, 1, 4, 3, 2],
                [1, 2, 3, 0, 4, 1, 2, 3],
                [5, 2, 1, 4, 0, 3, 2, 1],
                [2, 3, 4, 1, 3, 0, 1, 2],
                [3, 4, 3, 2, 2, 1, 0, 1],
                [4, 3, 2, 3, 1, 2, 1, 0]]
    d = env.distance_matrix()
    assert d.tolist() == expected
    assert d[0, 2] == 2 and d[2, 0] == 6  # the way back differs from the way there
    assert env.transitions()[1].tolist() == [1, 2, 1, 1]  # only "right" leaves cell 1
    opt = env.optimal_actions()
    assert opt[1, 0].tolist() == [False, True, False, False]  # from 1 to 0: right, around
    assert opt[2, 0].tolist() == [False, False, True, False]  # not left: 1 cannot be passed


def test_stepping_honours_the_arrow():
    env = gymnasium.make("GridWorld-v0", layout=ONE_WAY_RING).unwrapped
    env.reset(seed=0, options={"start": (1, 3), "goal": (1, 1)})
    _, _, _, _, info = env.step(3)  # left into the one-way cell: entering is allowed
    assert tuple(env.cells[env.agent]) == (1, 2) and info["distance"] == 7
    for action in (0, 2, 3):  # up, down, left: all stay
        env.step(action)
        assert tuple(env.cells[env.agent]) == (1, 2)
    env.step(1)
    assert tuple(env.cells[env.agent]) == (1, 3)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_slip_frequency(p):
    env = gymnasium.make("GridWorld-v0", layout="open", slip=p).unwrapped
    env.reset(seed=1, options={"start": (4, 4), "goal": (1, 1)})
    nxt, slips, n = env.transitions(), 0, 4000
    for k in range(n):
        if k % 50 == 0:  # back to the middle, away from the walls
            env.reset(options={"start": (4, 4), "goal": (1, 1)})
        before, action = env.agent, k % 4
        env.step(action)
        slips += env.agent != nxt[before, action]
    # a slip to another direction always lands elsewhere in the middle of the room,
    # except near walls: expected rate p (within 4 standard deviations)
    assert abs(slips / n - p) <= 4 * np.sqrt(p * (1 - p) / n) + 0.01
    with pytest.raises(ValueError, match="slip"):
        GridWorld("open", slip=1.5)


def hypercube_by_hand(d, n):
    """The authors' HyperCube, written out again: walls where x_0 in [int(0.2 n), int(0.4 n))
    and every other x_i < int(0.8 n), or x_0 in [int(0.6 n), int(0.8 n)) and every other x_i >=
    int(0.2 n); each of the 3^d moves adds -1, 0 or +1 to each coordinate; off the grid or into
    a wall, the agent stays. -> free cells (as tuples, row-major), next cell of (cell, move)."""
    def wall(c):
        rest = c[1:]
        first = int(0.2 * n) <= c[0] < int(0.4 * n) and all(x < int(0.8 * n) for x in rest)
        second = int(0.6 * n) <= c[0] < int(0.8 * n) and all(x >= int(0.2 * n) for x in rest)
        return first or second
    cells = [c for c in itertools.product(range(n), repeat=d) if not wall(c)]
    moves = list(itertools.product((-1, 0, 1), repeat=d))
    def step(c, m):
        t = tuple(x + dx for x, dx in zip(c, m))
        return t if all(0 <= x < n for x in t) and not wall(t) else c
    return cells, moves, step


def doorkey_by_hand(rows):
    """A key-and-door map's BFS written from the authors' KeyEnv rules, not from gridworld.py:
    a state is (row, col, key carried, door open); moves up, right, down, left enter a cell
    that is free, the key's once carried, the door's once open; pick up (4) takes the key from
    a neighbouring cell; toggle (5) opens a neighbouring door while carrying the key (the
    authors look only to the right: our departure). -> {state: {state: distance}}."""
    cells = {(r, c): char for r, row in enumerate(rows) for c, char in enumerate(row)}
    key = next(rc for rc, char in cells.items() if char == "K")
    door = next(rc for rc, char in cells.items() if char == "D")

    def enterable(rc, carried, opened):
        char = cells.get(rc, "#")
        return char == "." or (char == "K" and carried) or (char == "D" and opened)

    def neighbours(rc):
        return [(rc[0] + dr, rc[1] + dc) for dr, dc in ((-1, 0), (0, 1), (1, 0), (0, -1))]

    def successors(state):
        r, c, carried, opened = state
        for rc in neighbours((r, c)):
            yield (*rc, carried, opened) if enterable(rc, carried, opened) else state
        yield (r, c, 1, opened) if key in neighbours((r, c)) else state
        yield (r, c, 1, 1) if door in neighbours((r, c)) and carried else state

    states = [(r, c, k, d) for (r, c) in cells for k in (0, 1) for d in (0, 1)
              if (k or not d) and enterable((r, c), k, d)]
    truth = {}
    for start in states:  # plain breadth-first search, one start at a time
        dist, frontier = {start: 0}, [start]
        while frontier:
            ahead = []
            for state in frontier:
                for nxt in successors(state):
                    if nxt not in dist:
                        dist[nxt] = dist[state] + 1
                        ahead.append(nxt)
            frontier = ahead
        truth[start] = dist
    return truth


@pytest.mark.parametrize("layout", ["doorkey", "#######\n#K.#..#\n#..D..#\n#######"])
def test_doorkey_bfs_equals_a_search_from_the_authors_rules(layout):
    env = GridWorld(layout)
    truth = doorkey_by_hand(load_layout(layout).split("\n"))
    assert sorted(truth) == sorted(map(tuple, env.cells.tolist()))  # the same states
    d = env.distance_matrix()
    for s, row in truth.items():
        for g in truth:
            assert d[env.cell_indices(s), env.cell_indices(g)] == row.get(g, -1), (s, g)


def test_doorkey_pick_up_and_toggle_step_by_step():
    env = GridWorld("doorkey", render_mode="ansi")  # the key at (6, 3), the door at (6, 5)

    def after(state, *actions):
        env.reset(seed=0, options={"start": state, "goal": (8, 8, 1, 1)})
        for action in actions:
            env.step(action)
        return tuple(env._obs()["observation"].tolist())

    assert after((1, 1, 0, 0), 4) == (1, 1, 0, 0)  # the key is not beside the agent
    assert after((5, 3, 0, 0), 2) == (5, 3, 0, 0)  # it lies in its cell: a wall until taken
    assert after((5, 3, 0, 0), 4) == (5, 3, 1, 0)  # picked up from the cell above it
    assert after((5, 3, 1, 0), 2) == (6, 3, 1, 0)  # its cell is free once carried
    assert after((6, 4, 0, 0), 5, 1) == (6, 4, 0, 0)  # without the key the door stays shut
    assert after((2, 2, 1, 0), 5) == (2, 2, 1, 0)  # the door is not beside the agent
    assert after((6, 4, 1, 0), 5, 1, 1) == (6, 6, 1, 1)  # opened, then walked through
    assert after((6, 6, 1, 1), 5, 4) == (6, 6, 1, 1)  # open stays open; one key only
    env.reset(seed=0, options={"start": (6, 4, 1, 0), "goal": (6, 6, 1, 1)})
    assert "D" in env.render() and env.step(5)[0]["observation"].tolist() == [6, 4, 1, 1]
    assert "/" in env.render() and "K" not in env.render()  # open door, key carried
    check_env(gymnasium.make("GridWorld-v0", layout="doorkey").unwrapped)


def test_a_key_and_door_map_needs_one_of_each():
    for layout in ("#####\n#K..#\n#####", "#####\n#KDK#\n#...#\n#####"):
        with pytest.raises(ValueError, match="needs one 'K' and one 'D'"):
            GridWorld(layout)


def test_the_hidden_width_rule_widens_the_hypermazes_only():
    """--hidden 0: 256 units beyond 8 actions (a hypermaze's 3^d); 128 for 4 moves and for a
    key-and-door map's 6 actions (256 made doorkey 1.7 times the maze run's time)."""
    for layout, width in (("open", 128), ("doorkey", 128), ("hypermaze2s5", 256)):
        x, critic, actor = metricrl.build(GridWorld(layout), Args(env=layout), "cpu")
        assert actor.body[-1].in_features == width, layout


def test_a_tiny_key_and_door_map_learns(tmp_path):
    layout = tmp_path / "doorkey.txt"
    layout.write_text("#######\n#K.#..#\n#..D..#\n#######")
    m = metricrl.main(["--env", str(layout), "--steps", "600", "--episodes", "60", "--quiet",
                       "--hidden", "64", "--out", str(tmp_path / "run")])
    assert m["critic_success_rate"] > 0.6 and m["success_rate"] > 0.6 and m["actions"] == 6


KEY_ROOMS = "#######\n#K.#..#\n#..D..#\n#######"  # a key, a door, two rooms of 2 x 2


def test_the_papers_task_runs_from_the_start_without_the_key_to_each_cell_past_the_door():
    start, goals = GridWorld("doorkey").task()
    cells = GridWorld("doorkey").cells
    assert tuple(cells[start]) == (1, 1, 0, 0)  # the authors' start: top left, no key
    right_room = {(r, c, 1, 1) for r in range(1, 9) for c in range(6, 9)}  # x 6-8, y 1-8
    assert {tuple(cell) for cell in cells[goals].tolist()} == right_room
    start, goals = GridWorld(KEY_ROOMS).task()
    cells = GridWorld(KEY_ROOMS).cells
    assert tuple(cells[start]) == (1, 2, 0, 0)  # (1, 1) holds the key
    assert {tuple(cell) for cell in cells[goals].tolist()} == {
        (1, 4, 1, 1), (1, 5, 1, 1), (2, 4, 1, 1), (2, 5, 1, 1)}
    assert GridWorld("maze").task() is None
    assert GridWorld("#######\n#K.D..#\n#.....#\n#######").task() is None  # a door to go around


def behaviour_by_sampling(env, epsilon, steps, slip=0.0, episodes=20_000, seed=0):
    """The data's behaviour on the task, episode by episode: from the start to a uniform goal;
    a random action with probability epsilon (or where none is optimal), else an optimal one;
    with probability slip the move is one of the other actions."""
    rng = np.random.default_rng(seed)
    start, goals = env.task()
    s, g = np.full(episodes, start), rng.choice(goals, episodes)
    reached = np.zeros(episodes, dtype=bool)
    for _ in range(steps):
        best = env.optimal_actions(s, g)  # (E, A)
        pick = np.argmax(best + rng.random(best.shape), axis=1)
        random = rng.integers(best.shape[1], size=episodes)
        act = np.where((rng.random(episodes) < epsilon) | ~best.any(1), random, pick)
        other = (act + rng.integers(1, best.shape[1], size=episodes)) % best.shape[1]
        act = np.where(rng.random(episodes) < slip, other, act)
        s = np.where(reached, s, env.transitions()[s, act])
        reached |= s == g
    return reached.mean()


def test_the_data_reward_is_the_behaviours_chance_to_finish_the_task_in_t_steps():
    env = GridWorld(KEY_ROOMS)
    start, goals = env.task()
    d = env.distance_matrix()[start, goals]  # 5 to 8 actions: to the key, pick up, open, ...
    for t, share in ((d.min() - 1, 0.0), (d.max(), 1.0)):  # the expert: exactly
        args = Args(epsilon=0.0, episode_len=int(t))
        assert metricrl.behaviour_reward(env, args, start, goals) == pytest.approx(share)
    for eps, t, slip in ((0.5, 12, 0.0), (1.0, 30, 0.0), (0.0, 10, 0.3)):
        args = Args(epsilon=eps, episode_len=t, slip=slip)
        exact = metricrl.behaviour_reward(env, args, start, goals)
        assert exact == pytest.approx(behaviour_by_sampling(env, eps, t, slip), abs=0.015)
        assert 0.05 < exact < 0.95


def test_task_success_counts_the_starts_rollouts_to_the_goals_past_the_door():
    """Optimal, except towards half the task's goals: up (a wall at the start: stuck)."""
    env = GridWorld("doorkey")
    t = truth(env)
    start, goals = env.task()
    policy = opt_table(env).float()
    stuck = goals[::2]
    policy[:, stuck] = torch.eye(6)[0]  # up
    dz = t["d"].float().clone()
    dz[:, stuck] = 0  # a flat critic: its greedy action is the first, up
    x = metricrl.build(env, Args(), "cpu")[0]
    m = metricrl.evaluate(dz, TableActor(policy), x, t)
    share = 1 - len(stuck) / len(goals)
    assert m["success_task"] == pytest.approx(share) and m["critic_success_task"] == share
    plain = truth(GridWorld("rooms"))
    x = metricrl.build(GridWorld("rooms"), Args(), "cpu")[0]
    m = metricrl.evaluate(None, TableActor(opt_table(GridWorld("rooms")).float()), x, plain)
    assert np.isnan(m["success_task"]) and m["success_rate"] == 1.0


def test_a_key_and_door_maps_figure_shows_each_flag_state(tmp_path, monkeypatch):
    drawn, savefig = [], metricrl.Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn.append(fig)
        savefig(fig, *args, **kwargs)

    monkeypatch.setattr(metricrl.Figure, "savefig", keep)
    layout = tmp_path / "keys.txt"
    layout.write_text(KEY_ROOMS)
    m = metricrl.main(["--env", str(layout), "--out", str(tmp_path / "a"), *TINY])
    env = GridWorld(KEY_ROOMS)
    d = env.distance_matrix()
    goal = np.argmax(d.max(0))
    titles = [ax.get_title() for ax in drawn[0].axes][:4]
    for title, flags in zip(titles, ((0, 0), (1, 0), (1, 1))):
        plane = (env.cells[:, 2:] == flags).all(1)
        assert title.endswith(f" of {(plane & (d[:, goal] > 0)).sum()} cells fail (×)"), title
    assert [title.split(":")[0] for title in titles[:3]] == [
        "No key", "Key carried, door closed", "Door open"]
    assert f"the paper's task: success {m['success_task']:.3f}" in drawn[0]._suptitle.get_text()
    assert 0 <= m["data_reward"] <= 1 and "success_task" in m


def test_compare_on_a_key_and_door_map_adds_the_task_columns(tmp_path):
    layout = tmp_path / "keys.txt"
    layout.write_text(KEY_ROOMS)
    for env, has in ((str(layout), True), (tiny_map(tmp_path), False)):
        out = tmp_path / f"cmp-{has}"
        experiments.main(["--compare", "--env", env, "--algos", "metricrl-quasimetric,gcbc",
                          "--epsilons", "1", "--seeds", "1", *TINY, "--out", str(out)])
        header = (out / "compare.md").read_text().splitlines()[2]
        assert ("| data_reward | success_task | critic_success_task |" in header) == has
        runs = [json.loads(p.read_text()) for p in out.glob("*/metrics.json")]
        assert {run["flags"]["metric"] for run in runs} == {"quasimetric", "euclidean"}


def test_hypermaze_cells_moves_and_bfs_equal_a_brute_force_by_hand():
    env = GridWorld("hypermaze3s5")
    cells, moves, step = hypercube_by_hand(3, 5)
    assert [tuple(c) for c in env.cells.tolist()] == cells and len(cells) == 5**3 - 2 * 16
    assert [tuple(m) for m in env.moves.tolist()] == moves  # the authors' order
    index = {c: i for i, c in enumerate(cells)}
    nxt = np.array([[index[step(c, m)] for m in moves] for c in cells])
    assert (env.transitions() == nxt).all()
    d = np.full((len(cells), len(cells)), -1)  # Floyd-Warshall, independent of the BFS
    d[np.arange(len(cells)), np.arange(len(cells))] = 0
    dist = np.where(nxt[:, :, None] == np.arange(len(cells)), 1, np.inf).min(1)
    dist[np.arange(len(cells)), np.arange(len(cells))] = 0
    for k in range(len(cells)):
        dist = np.minimum(dist, dist[:, k:k + 1] + dist[k:k + 1, :])
    d = np.where(np.isinf(dist), -1, dist)
    assert (env.distance_matrix() == d).all()
    assert (gridworld.world("hypermaze4")[0] != "#").sum() == 7952  # the paper's map


def test_hypermaze_moves_as_the_authors_env():
    """Diagonals and the stay move; off the grid or into a slab, the agent stays."""
    env = GridWorld("hypermaze3s5")
    action = {tuple(m): a for a, m in enumerate(env.moves.tolist())}
    env.reset(options={"start": (0, 0, 0), "goal": (4, 4, 4)})
    for move, after in [((-1, -1, -1), (0, 0, 0)),  # off the grid: stays
                        ((1, 1, 1), (0, 0, 0)),  # into the first slab, (1, 1, 1): stays
                        ((0, 0, 0), (0, 0, 0)),  # stay
                        ((0, 1, 1), (0, 1, 1)),  # diagonals
                        ((0, 1, 1), (0, 2, 2)),
                        ((0, 1, 1), (0, 3, 3)),
                        ((1, 1, 1), (1, 4, 4)),  # through the first slab's gap, x_i >= 4
                        ((1, 0, 0), (2, 4, 4)),
                        ((1, 0, 0), (2, 4, 4))]:  # into the second slab, (3, 4, 4): stays
        obs, *_ = env.step(action[move])
        assert tuple(obs["observation"].tolist()) == after, (move, after)
    assert env.action_space.n == 27 and env.observation_space["observation"].shape == (3,)
    check_env(gymnasium.make("GridWorld-v0", layout="hypermaze2s5").unwrapped)
    assert "A" in GridWorld("hypermaze3s5", render_mode="ansi").render()  # a 2-D slice
    with pytest.raises(ValueError, match="2-D maps"):
        gridworld.ImageObservation(env)


def test_a_tiny_hypermaze_learns(tmp_path):
    out = tmp_path / "h"
    metrics = metricrl.main(["--env", "hypermaze3s5", "--steps", "300", "--eval-every", "150",
                             "--quiet", "--out", str(out)])
    assert metrics["critic_success_rate"] > 0.9 and metrics["success_rate"] > 0.5
    assert metrics["flags"]["actions"] == "auto" and (out / "metricrl.png").exists()


def test_every_action_loss_is_the_mean_of_the_one_action_loss():
    """--actions all: for each (s, g), sum_a w(s, a, g) / k(s) (-log pi(a | s, g)) over the
    data's actions a at s, the one-action loss's mean over a uniform action at s."""
    env, args, data, x, critic, actor = tiny_run("rooms", critic="bfs", actions="all",
                                                 actor_batch=64, goals="uniform")
    data = {**data, **metricrl.balance(data)}
    torch.manual_seed(3)
    loss = metricrl.actor_step(critic, actor, x, None, data, args)
    torch.manual_seed(3)
    s, _, _, g = metricrl.sample(data, args.actor_batch, "uniform", args)
    d = torch.as_tensor(np.array(env.distance_matrix())).float()
    logp = torch.log_softmax(actor(x, s, g), -1)
    total = 0.0
    for i in range(len(s)):
        taken = data["moves"][s[i]]
        acts = (taken >= 0).nonzero()[:, 0]
        w = torch.exp(args.beta * (d[s[i], g[i]] - d[taken[acts], g[i]])).clamp(max=args.w_max)
        total = total - (w * logp[i, acts]).sum() / len(acts)
    assert loss.item() == pytest.approx(total.item() / len(s), rel=1e-5)


def test_oneway_map_is_connected_and_asymmetric():
    env = GridWorld("oneway")
    d = env.distance_matrix()
    assert (d >= 0).all() and (d != d.T).mean() > 0.3
    a, b = env.cell_indices([[3, 1], [3, 11]])
    assert d[a, b] == 10 and d[b, a] == 24


def test_named_maps():
    assert GridWorld("maze").distance_matrix().max() >= 40
    assert 90 <= len(GridWorld("maze").cells) <= 110
    assert len(GridWorld("open").cells) == 64
    assert len(GridWorld("rooms").cells) == 104


def test_border_is_optional_and_file_layouts_load(tmp_path):
    path = tmp_path / "map.txt"
    path.write_text(RING + "\n")
    env = GridWorld(str(path))
    assert env.distance_matrix().tolist() == RING_DISTANCES
    assert load_layout(path) == load_layout(RING)  # a pathlib.Path works too


@pytest.mark.parametrize("spec, message", [
    ("no/such/map.txt", "file not found"),
    ("castle", "unknown layout 'castle'; known: open, rooms, maze, loops"),
    ("maze8", "odd size"),
    ("....\n...\n....", "row 1 has 3 characters"),
    ("....\n.x..", "unknown character 'x' at row 1, column 1"),
    ("#.#\n###", "fewer than two free cells"),
])
def test_load_layout_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        load_layout(spec)


def test_gridworld_rejects_bad_actions_options_and_layouts():
    env = GridWorld("open")
    env.reset(seed=0)
    for action in (4, -1, 1.7, "x", np.array([1, 2])):
        with pytest.raises(ValueError, match="action must be one integer"):
            env.step(action)
    env.step(np.int64(2))  # what action_space.sample() gives
    for options, error in (({"begin": (1, 1)}, ValueError), ({"start": (1,)}, ValueError),
                           ({"start": "ab"}, ValueError), ({"start": (1.5, 2)}, TypeError)):
        with pytest.raises(error, match="start|cells must be integer"):
            env.reset(options=options)
    with pytest.raises(TypeError, match="layout must be a name, a path or map text, got int"):
        GridWorld(123)
    with pytest.raises(ValueError, match="slip must be a number in"):
        GridWorld("open", slip="x")


# ===================================================================== metricrl.py
ROOM = "#######\n#.....#\n#.#...#\n#.....#\n#######"  # a 3 x 5 room with a pillar
TINY = ["--episodes", "20", "--episode-len", "30", "--steps", "60", "--eval-every", "30",
        "--hidden", "32", "--quiet"]


def tiny_map(tmp_path):
    path = tmp_path / "room.txt"
    path.write_text(ROOM)
    return str(path)


def truth(env, **knobs):
    return metricrl.ground_truth(env, Args(**knobs), "cpu")


def opt_table(env):
    """The whole (N, N, A) table of optimal actions (small maps only)."""
    return torch.as_tensor(np.array(env.optimal_actions()))


def tiny_run(layout, seed=0, **knobs):
    """The data, features, networks and args of a tiny run (nothing trained yet)."""
    env = GridWorld(layout)
    args = Args(**{"episodes": 30, "episode_len": 30, "hidden": 32, **knobs})
    torch.manual_seed(seed)
    data = metricrl.collect_dataset(env, args, np.random.default_rng(seed))
    x, critic, actor = metricrl.build(env, args, "cpu")
    return env, args, data, x, critic, actor


class TableActor(nn.Module):
    """A 'policy network' that returns fixed logits from a table (N, N, 4)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x, s, g):  # (N, F), (B,), (B,) -> (B, 4)
        return self.logits[s, g]


# ------------------------------------------------------------------ 1. data
def test_expert_data_rarely_bumps_random_data_often():
    env = GridWorld(MAZE7)
    bumps = []
    for epsilon in (0.0, 1.0):
        data = metricrl.collect_dataset(env, Args(episodes=50, epsilon=epsilon),
                                        np.random.default_rng(0))
        bumps.append((data["s"] == data["s2"]).float().mean().item())
    assert bumps[0] < 0.05 and bumps[1] > 0.3  # optimal moves never bump into a wall


@pytest.mark.parametrize("knobs", [{"env": "open", "holdout": 0.1},
                                   {"env": "rooms", "data": "split"}])
def test_expert_data_goes_round_the_walls_of_the_data_map(knobs):
    """The expert's shortest moves are the data's map's: a held-out cell and the split are walls,
    and a target out of reach is redrawn (it walked into a held-out cell for ever: 80% bumps)."""
    env = GridWorld(knobs["env"])
    args = Args(episodes=50, epsilon=0.0, **knobs)
    data = metricrl.collect_dataset(env, args, np.random.default_rng(0))
    assert (data["s"] == data["s2"]).double().mean() < 0.05
    held = env.held_out(args.holdout, args.seed)
    nxt, d = env.data_map(held, args.data == "split")
    assert not held[nxt[~held]].any() and (d[~held][:, held] == -1).all()  # held: walls


def test_data_is_time_major_and_each_trajectory_continues():
    """Row t * E + e is step t of trajectory e: its s' is the s of row (t + 1) * E + e."""
    env = GridWorld(MAZE7)
    data = metricrl.collect_dataset(env, Args(episodes=7, episode_len=5), np.random.default_rng(0))
    e = 7
    assert data["t"].tolist() == [t for t in range(5) for _ in range(e)]
    assert data["episode"].tolist() == list(range(e)) * 5
    assert (data["s2"][:-e] == data["s"][e:]).all()
    nxt = torch.as_tensor(np.array(env.transitions()))
    assert (nxt[data["s"], data["a"]] == data["s2"]).all()  # no slip: the move as taken


def test_held_out_cells_never_enter_the_data():
    env = GridWorld("maze")
    args = Args(holdout=0.2, episodes=100)
    data = metricrl.collect_dataset(env, args, np.random.default_rng(0))
    held = torch.as_tensor(env.held_out(0.2, 0))
    assert held.sum() == 20
    assert not held[data["s"]].any() and not held[data["s2"]].any()
    visited = torch.zeros(len(env.cells), dtype=torch.bool)
    visited[data["s"]] = True
    assert (visited == ~held).all()  # every other cell is visited
    assert (data["s2"][:-100] == data["s"][100:]).all()  # still whole trajectories


def test_one_direction_keeps_one_way_between_each_pair_of_neighbours():
    env = GridWorld("open")
    full = metricrl.collect_dataset(env, Args(episodes=50), np.random.default_rng(0))
    one = metricrl.collect_dataset(env, Args(episodes=50, data="one-direction"),
                                   np.random.default_rng(0))
    moves = set(zip(one["s"].tolist(), one["s2"].tolist()))
    all_moves = set(zip(full["s"].tolist(), full["s2"].tolist()))
    assert moves <= all_moves
    assert not any((v, u) in moves for u, v in moves if u != v)  # never both ways
    ways = {frozenset(move) for move in all_moves if move[0] != move[1]}
    kept = {frozenset(move) for move in moves if move[0] != move[1]}
    assert kept == ways  # each pair of neighbours the data moves between keeps one way
    bumps = full["s"] == full["s2"]
    assert (one["s"] == one["s2"]).sum() == bumps.sum()  # bumps are not moves: all stay
    assert 0.3 < len(one["s"]) / len(full["s"]) < 0.8


def test_data_size_rule_grows_with_the_map():
    def episodes(name, **kw):  # trajectories collected for --episodes 0 (or as given)
        data = metricrl.collect_dataset(GridWorld(name), Args(episode_len=2, **kw),
                                        np.random.default_rng(0))
        return len(data["s"]) // 2
    assert [episodes(name) for name in ("maze", "maze25", "maze51")] == [200, 600, 2000]
    assert episodes("maze51", episodes=7) == 7
    rule = metricrl.default_episodes
    assert rule(128, 4, 100) == 200 and rule(129, 4, 100) == 400
    assert rule(497, 81, 100) == 200 * 79  # per 512 moves: as many of each
    assert rule(7952, 81, 100) * 100 <= 2**24 < rule(7952, 81, 100) * 100 + 100  # multinomial's


def test_cell_features_one_hot_and_scaled_coordinates():
    env = GridWorld(RING)  # 3 rows x 4 columns
    assert torch.equal(metricrl.cell_features(env, Args()), torch.eye(10))
    xy = metricrl.cell_features(env, Args(features="xy", fourier=0))  # the plain coordinates
    cells = env.cell_indices([[0, 0], [2, 3], [1, 0], [0, 1]])
    expected = torch.tensor([[-1, -1], [1, 1], [0, -1], [-1, -1 / 3]])
    assert torch.allclose(xy[cells], expected)
    fourier = metricrl.cell_features(env, Args(features="xy", fourier=3))
    assert fourier.shape == (10, 2 + 4 * 3) and torch.allclose(fourier[:, :2], xy)
    angles = xy[:, 1] * np.pi * 4  # the column at the third frequency, pi 2^2
    assert torch.allclose(fourier[:, 2 + 5], torch.sin(angles), atol=1e-5)
    assert torch.allclose(fourier[:, 8 + 5], torch.cos(angles), atol=1e-5)


def test_image_features_are_the_wrappers_images_and_the_cnn_sees_every_pixel():
    env = GridWorld("rooms")  # 13 x 13 cells: 26 pixels a side at tile 2
    x = metricrl.cell_features(env, Args(features="image"))
    images = gridworld.ImageObservation(env, 2).images(np.arange(104))
    assert x.shape == (104, 3, 26, 26) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, torch.as_tensor(images).permute(0, 3, 1, 2) / 255)
    args = Args(features="image", channels=4, hidden=16)
    _, critic, actor = metricrl.build(env, args, "cpu")
    convs = [m for m in critic.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [1, 2, 2, 2] and convs[0].padding == (0, 0)
    assert metricrl.embed(critic, x, args).shape == (104, 32)
    seen = metricrl.actor_input(critic, x, args)  # the critic's CNN features, standardized
    assert seen.shape == (104, 4 * 3 * 3) and not seen.requires_grad
    assert torch.allclose(seen.mean(0), torch.zeros(36), atol=1e-3)
    assert actor(seen, torch.tensor([0, 5]), torch.tensor([7, 7])).shape == (2, 4)
    assert not any(isinstance(m, nn.Conv2d) for m in actor.modules())  # a torso shared
    gcbc = metricrl.build(env, dataclasses.replace(args, algo="gcbc"), "cpu")[2]
    assert gcbc(x, torch.tensor([0]), torch.tensor([7])).shape == (1, 4)  # its own CNN
    cnn = critic[0]
    with torch.no_grad():  # positive weights: every ReLU passes, a pixel seen has a gradient
        for p in cnn.parameters():
            p.fill_(0.1)
    x.requires_grad_(True)
    cnn(x[:1]).sum().backward()
    assert (x.grad[0].abs().sum(0) > 0).all()  # to the last row and column (padded to 33)

def test_actor_first_layer_split_equals_an_mlp_on_concatenated_features():
    x = torch.randn(6, 3)
    actor = metricrl.PairNet(3, 8, 4)
    s, g = torch.tensor([0, 5, 2]), torch.tensor([1, 1, 4])
    layer = nn.Linear(6, 8)
    with torch.no_grad():
        layer.weight.copy_(torch.cat([actor.s_in.weight, actor.g_in.weight], dim=1))
        layer.bias.copy_(actor.s_in.bias)
    expected = actor.body(layer(torch.cat([x[s], x[g]], dim=1)))  # (3, 4)
    assert torch.allclose(actor(x, s, g), expected, atol=1e-6)


def test_build_makes_each_critic():
    env = GridWorld(ONE_WAY_RING)  # 8 cells
    x, critic, actor = metricrl.build(env, Args(latent=5, hidden=16), "cpu")
    assert critic(x).shape == (8, 5) and actor(x, torch.arange(8), torch.arange(8)).shape == (8, 4)
    assert actor.s_in.out_features == 16 and critic[0].out_features == 16  # --hidden wide
    assert sum(isinstance(m, nn.Linear) for m in critic.modules()) == 3  # two hidden layers
    assert metricrl.build(env, Args(algo="gcbc"), "cpu")[1] is None
    td = metricrl.build(env, Args(algo="td"), "cpu")[1]
    assert td(x, torch.arange(8), torch.arange(8)).shape == (8, 1)
    exact = metricrl.build(env, Args(critic="exact", super_state=True), "cpu")[1]
    assert exact[-1].weight.shape == (9, 8)  # k = N + 1 coordinates, one-hot in: a table
    oracle = metricrl.build(env, Args(critic="bfs"), "cpu")[1]
    assert not oracle.weight.requires_grad
    assert oracle.weight.tolist() == env.distance_matrix().tolist()


# ------------------------------------------------------------------ 2. critic
def test_weighted_mean_counts_each_entry_n_times():
    values, counts = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 2.0])
    assert metricrl.weighted_mean(values, counts).item() == pytest.approx(7 / 3)
    assert metricrl.weighted_mean(values, torch.zeros(3)).item() == 0  # no pair: 0, not nan


def test_critic_loss_shapes_and_hand_computed_value():
    """Two cells at distance 5: one move 0 -> 1 of length 5, pairs (0, 1) and (1, 0)."""
    z = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    d = metricrl.pairwise(z, z)  # (2, 2)
    moves, pairs = torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    loss, info = metricrl.metric_loss(d, moves, pairs, Args(lam=0.5))
    negative = -np.log(5 + 1e-6)  # three pairs, each at distance 5
    assert info["positive"].item() == pytest.approx(16.0)  # (5 - 1)^2
    assert info["negative"].item() == pytest.approx(negative, rel=1e-5)
    assert loss.shape == () and loss.item() == pytest.approx(16 + 0.5 * negative, rel=1e-5)


def test_pair_counts_by_hand():
    data = {"s": torch.tensor([0, 0, 1, 2]), "s2": torch.tensor([1, 1, 1, 0])}
    moves, pairs = metricrl.pair_counts(data, 3)
    assert moves.tolist() == [[0, 2, 0], [0, 0, 0], [1, 0, 0]]  # 1 -> 1 bumps: not a move
    # (s_i, s'_j), i != j: u = 0, v = 1: i in {0, 1}, j in {0, 1, 2}, i != j: 4 pairs
    assert pairs.tolist() == [[0, 4, 0], [1, 0, 0], [0, 3, 0]]


def test_dataset_critic_loss_equals_the_loss_over_all_its_pairs_of_transitions():
    """pair_counts groups the pairs by cell: the same loss as over every (i, j) of the data."""
    env = GridWorld(ROOM)
    data = metricrl.collect_dataset(env, Args(episodes=3, episode_len=40), np.random.default_rng(0))
    z = torch.randn(len(env.cells), 5, dtype=torch.float64)
    s, s2 = data["s"], data["s2"]
    d_pos = (z[s] - z[s2]).norm(dim=1)  # (M,) each transition's length
    n_pos = (s != s2).double()  # bumps are not moves
    n_neg = (s[:, None] != s2[None, :]).double()  # (M, M): pairs of two cells,
    n_neg.fill_diagonal_(0)  # and i != j
    positive = ((d_pos - 1) ** 2 * n_pos).sum() / n_pos.sum()
    negative = (-torch.log(torch.cdist(z[s], z[s2]) + 1e-6) * n_neg).sum() / n_neg.sum()
    moved, pairs = (c.double() for c in metricrl.pair_counts(data, len(env.cells)))
    grouped, info = metricrl.metric_loss(metricrl.pairwise(z, z), moved, pairs, Args(lam=0.7))
    assert grouped.item() == pytest.approx((positive + 0.7 * negative).item(), rel=1e-9)
    assert info["positive"].item() == pytest.approx(positive.item(), rel=1e-9)

def test_exact_loss_by_hand():
    """push = mean over pairs of min(z_g(s) - z_g(g), N); violation = mean relu(z_c(u) - z_c(v)
    - 1)^2 over moves and coordinates."""
    z = torch.tensor([[1.0, 2.0, 9.0], [1.0, 0.5, 1.0], [3.0, 0.0, -1.0]])
    moves = torch.tensor([[0.0, 1, 0], [0, 0, 1], [0, 0, 0]])  # 0 -> 1, 1 -> 2
    pairs = torch.tensor([[0.0, 0, 2], [0, 0, 0], [1, 0, 0]])
    loss, info = metricrl.exact_loss(z, moves.nonzero().T, moves, pairs, torch.tensor(2.0))
    # z_g(s) - z_g(g), capped at N = 3, weighted by moves + pairs: 1.5 + 2 * 3 + 2 + 2
    assert info["push"].item() == pytest.approx(11.5 / 5)
    # move 0 -> 1: relu(0, 0.5, 7)^2; move 1 -> 2: relu(-3, -0.5, 1)^2; over 2 moves x 3
    assert info["violation"].item() == pytest.approx((0.25 + 49 + 1) / 6)
    assert loss.item() == pytest.approx(-11.5 / 5 + 2 * 50.25 / 6)
    no_moves = torch.zeros(3, 3)  # data without a move between two cells: a loss, not nan
    edges = no_moves.nonzero().T  # (2, 0)
    assert torch.isfinite(metricrl.exact_loss(torch.randn(3, 3), edges, no_moves, no_moves, 1.0)[0])


def test_super_state_joins_each_trajectory_end():
    """Two trajectories of 3 steps, 10 -> 13 and 20 -> 23, in time order."""
    s = torch.tensor([10, 20, 11, 21, 12, 22])
    data = {"s": s, "a": torch.ones_like(s), "s2": s + 1}
    joined = metricrl.with_super_state(data, Args(episode_len=3), 30)
    assert joined["s"][:6].tolist() == s.tolist() and joined["s2"][:6].tolist() == (s + 1).tolist()
    assert joined["s"][6:].tolist() == [13, 23] and joined["s2"][6:].tolist() == [30, 30]


def test_embed_adds_the_super_state_from_zero_features():
    critic = nn.Linear(4, 3, bias=False)
    x = torch.eye(4)
    assert torch.equal(metricrl.embed(critic, x, Args()), critic(x))
    z = metricrl.embed(critic, x, Args(super_state=True))
    assert z.shape == (5, 3) and torch.equal(z[4], torch.zeros(3)) and torch.equal(z[:4], critic(x))


# ------------------------------------------------------------------ 3. value and advantage
def test_latent_distances_by_hand():
    z, zg = torch.zeros(5, 3), torch.arange(15.0).view(5, 3)
    d = metricrl.latent_distance(z, zg)
    assert d.shape == (5,) and d[1].item() == pytest.approx(np.sqrt(9 + 16 + 25))
    a, b = torch.tensor([0.0, 0, 3, 1]), torch.tensor([3.0, 4, 1, 2])
    # quasimetric: ||first half|| + max relu(second half): 5 + max(2, 0); back: 5 + max(0, 1)
    assert metricrl.latent_distance(a, b, "quasimetric").item() == pytest.approx(7)
    assert metricrl.latent_distance(b, a, "quasimetric").item() == pytest.approx(6)
    a, b = torch.tensor([1.0, 5, 2]), torch.tensor([3.0, 1, 2])
    assert metricrl.latent_distance(a, b, "max-relu").item() == 4
    assert metricrl.latent_distance(b, a, "max-relu").item() == 2


def test_quasimetric_head_is_a_quasimetric_and_can_be_asymmetric():
    torch.manual_seed(0)
    x, y, w = torch.randn(3, 500, 8)
    for metric in ("quasimetric", "max-relu"):
        dxy = metricrl.latent_distance(x, y, metric)
        assert torch.allclose(metricrl.latent_distance(x, x, metric), torch.zeros(500))
        assert (dxy >= 0).all()
        dxw, dyw = metricrl.latent_distance(x, w, metric), metricrl.latent_distance(y, w, metric)
        assert (dxw <= dxy + dyw + 1e-5).all()  # triangle inequality
        assert (dxy - metricrl.latent_distance(y, x, metric)).abs().max() > 0.1  # asymmetric
        all_pairs = metricrl.pairwise(x[:5], y[:7], metric)  # (5, 7)
        assert all_pairs.shape == (5, 7)
        assert torch.allclose(all_pairs[2, 3], metricrl.latent_distance(x[2], y[3], metric))
    assert torch.allclose(metricrl.latent_distance(x, y), metricrl.latent_distance(y, x))


def test_value_and_td_distance_by_hand():
    d = torch.tensor([0.0, 1.0, 3.0])
    assert metricrl.value(d, 0.5).tolist() == [1.0, 0.5, 0.125]
    assert metricrl.td_distance(metricrl.value(d, 0.9), 0.9).tolist() == pytest.approx([0, 1, 3])
    assert metricrl.td_distance(torch.tensor(0.0), 0.9).isfinite()  # V = 0: far, not inf
    assert metricrl.td_distance(torch.tensor(1.5), 0.9) == 0  # V above 1: at the goal, not < 0


def test_the_actor_reads_the_distance_from_s_to_g():
    """On the one-way ring, 0 -> 2 takes 2 steps and 2 -> 0 takes 6: the distances the actor's
    weights read are d(s, g) and d(s', g), for the oracle's table and the asymmetric latent
    ones (linear weights: w = A = d(s, g) - d(s', g))."""
    env, args, _, x, critic, _ = tiny_run(ONE_WAY_RING, critic="bfs", weighting="linear")
    zero, one, two = torch.tensor([0]), torch.tensor([1]), torch.tensor([2])
    assert metricrl.actor_weights(critic, x, None, zero, one, two, args).item() == 2 - 1
    assert metricrl.actor_weights(critic, x, None, two, one, zero, args).item() == 6 - 7
    exp = dataclasses.replace(args, weighting="exp")  # A = 1 step: exp(6), below the clip
    assert metricrl.actor_weights(critic, x, None, zero, one, two, exp).item() == \
        pytest.approx(np.exp(6.0))
    z = torch.tensor([[1.0, 5, 2], [3.0, 1, 2], [1.0, 5, 2]])  # max-relu: 4 from 0 to 1, 2 back
    exact = Args(critic="exact", weighting="linear")
    assert metricrl.actor_weights(critic, x, z, zero, two, one, exact).item() == 4 - 4
    assert metricrl.actor_weights(critic, x, z, zero, one, one, exact).item() == 4 - 0
    assert metricrl.actor_weights(critic, x, z, one, zero, zero, exact).item() == 2 - 0
    quasi = Args(metric="quasimetric", weighting="linear")
    z = torch.tensor([[0.0, 0, 3, 1], [3.0, 4, 1, 2]])  # 7 from 0 to 1, 6 back
    assert metricrl.actor_weights(critic, x, z, one, zero, zero, quasi).item() == pytest.approx(6)
    gcbc = metricrl.actor_weights(None, x, None, torch.tensor([0, 1]), torch.tensor([1, 2]),
                                  torch.tensor([2, 2]), Args(algo="gcbc"))
    assert gcbc.tolist() == [1.0, 1.0]


def test_advantage_weights_exp_clipped_and_linear():
    d, d2 = torch.tensor([5.0, 5.0, 5.0]), torch.tensor([4.0, 5.0, 6.0])
    args = Args(beta=6.0, w_max=100.0)
    assert metricrl.advantage_weights(d, d2, args).tolist() == pytest.approx(
        [100.0, 1.0, np.exp(-6.0)])
    linear = metricrl.advantage_weights(d, d2, Args(weighting="linear"))
    assert linear.tolist() == [1.0, 0.0, -1.0]


# ------------------------------------------------------------------ 4. actor
def test_actor_loss_by_hand():
    logits, a = torch.zeros(2, 4), torch.tensor([0, 3])  # uniform: log pi = -log 4
    loss = metricrl.actor_loss(logits, a, torch.tensor([1.0, 3.0]))
    assert loss.item() == pytest.approx((1 + 3) * np.log(4) / 2)
    logits = torch.tensor([[np.log(2.0), 0, 0, 0]])  # pi(0) = 2 / 5
    assert metricrl.actor_loss(logits, torch.tensor([0]), torch.ones(1)).item() == \
        pytest.approx(-np.log(0.4))


def test_balance_weights_by_hand():
    """Cell 0: move (0, 1) twice and (0, 2) once; cell 1: move (1, 0) once."""
    data = {"s": torch.tensor([0, 0, 0, 1]), "a": torch.tensor([1, 1, 2, 0]),
            "s2": torch.tensor([5, 5, 6, 7])}
    balanced = metricrl.balance(data)
    assert balanced["cells"].tolist() == [0, 1]
    # 1 / (n(s, a) k(s)): 1 / (2 * 2) for each of the two (0, 1), 1 / (1 * 2), 1 / (1 * 1)
    assert balanced["weight"].tolist() == [0.25, 0.25, 0.5, 1.0]
    assert balanced["moves"].tolist() == [[-1, 5, 6], [7, -1, -1]]  # --actions all's table


def test_uniform_sampler_covers_every_cell_and_action_alike():
    """Expert data visits cells and takes actions unevenly; goals="uniform" draws s uniformly
    over the data's cells, a uniformly over the actions the data has at s, g over the cells."""
    env = GridWorld(MAZE7)
    args = Args(epsilon=0.0, episodes=20, episode_len=30)
    data = metricrl.collect_dataset(env, args, np.random.default_rng(0))
    n_cells = len(env.cells)
    visits = torch.bincount(data["s"], minlength=n_cells)
    moves = torch.bincount(4 * data["s"] + data["a"], minlength=4 * n_cells).view(-1, 4)
    assert visits.max() > 3 * visits[visits > 0].min()  # the data is skewed
    data.update(metricrl.balance(data))
    torch.manual_seed(0)
    n = 200_000
    s, a, s2, g = metricrl.sample(data, n, "uniform", args)
    seen = set(zip(data["s"].tolist(), data["a"].tolist(), data["s2"].tolist()))
    assert set(zip(s.tolist(), a.tolist(), s2.tolist())) <= seen  # real transitions of the data
    cells = (visits > 0).sum().item()
    for drawn in (s, g):
        counts = torch.bincount(drawn, minlength=n_cells)
        assert (counts[visits > 0] > 0.9 * n / cells).all() and (counts[visits == 0] == 0).all()
    drawn = torch.bincount(4 * s + a, minlength=4 * n_cells).view(-1, 4)  # (N, 4)
    share = drawn / drawn.sum(1, keepdim=True).clamp(min=1)
    expected = (moves > 0) / (moves > 0).sum(1, keepdim=True).clamp(min=1)
    assert (share - expected)[visits > 0].abs().max() < 0.05  # each action of the data alike
    _, _, _, g = metricrl.sample(data, n, "random", args)  # the paper's: as often as visited
    assert torch.bincount(g, minlength=n_cells).max() > 2 * n / cells


def trajectories(episodes=3, length=5):
    """Time-major data of trajectories e whose step t goes from state 100 e + t to one more."""
    t, e = torch.meshgrid(torch.arange(length), torch.arange(episodes), indexing="ij")
    s = (100 * e + t).flatten()
    return {"s": s, "a": torch.zeros_like(s), "s2": s + 1, "episode": e.flatten(), "t": t.flatten()}


def test_hindsight_goals_are_later_states_of_the_same_trajectory():
    data, args = trajectories(), Args(episodes=3, episode_len=5)
    torch.manual_seed(0)
    s, _, _, g = metricrl.sample(data, 2000, "hindsight", args)
    assert (g // 100 == s // 100).all() and (g % 100 > s % 100).all()
    assert set((g - s).tolist()) == {1, 2, 3, 4, 5}  # every later state of the trajectory
    _, _, _, g = metricrl.sample(data, 2000, "random", args)
    assert (g // 100 != s // 100).any()


def test_mixed_goals_are_half_hindsight():
    """td's critic: half hindsight goals; a random one looks like one 1/3 x 2/5 of the time."""
    torch.manual_seed(0)
    s, _, _, g = metricrl.sample(trajectories(), 8000, "mixed", Args(episodes=3, episode_len=5))
    later = ((g // 100 == s // 100) & (g % 100 > s % 100)).float().mean().item()
    assert later == pytest.approx(0.5 + 0.5 * 0.4 / 3, abs=0.025)


# ------------------------------------------------------------------ 5. baselines
def test_td_loss_target_hand_computed():
    class Constant(nn.Module):  # V(s, g) = c for every pair
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x, s, g):
            return torch.full((len(s), 1), self.c)

    args = Args(gamma=0.9, expectile=0.8)
    s, s2, g = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 2]), torch.tensor([2, 2, 2])
    # pair 0: y = 0.9 * V_target = 0.45 > V = 0.3: weight 0.8; pair 1 reaches g: y = 0.9;
    # pair 2 is s = g: left out
    loss = metricrl.td_loss(Constant(0.3), Constant(0.5), None, s, s2, g, args)
    assert loss.item() == pytest.approx((0.8 * 0.15 ** 2 + 0.8 * 0.6 ** 2) / 2, rel=1e-5)
    loss = metricrl.td_loss(Constant(0.95), Constant(0.5), None, s, s2, g, args)
    assert loss.item() == pytest.approx((0.2 * 0.5 ** 2 + 0.2 * 0.05 ** 2) / 2, rel=1e-5)


# ------------------------------------------------------------------ 6. training
def test_critic_step_moves_td_target_and_raises_mu():
    env, args, data, x, critic, _ = tiny_run(ROOM, algo="td", actor_batch=64)
    data = {**data, **metricrl.balance(data)}
    target = copy.deepcopy(critic)
    for p in target.parameters():
        nn.init.zeros_(p)
    metricrl.critic_step(critic, x, data, None, args, {"target": target})
    for p_target, p in zip(target.parameters(), critic.parameters()):
        assert torch.allclose(p_target, metricrl.TARGET_RATE * p)  # from 0 towards V
    env, args, data, x, critic, _ = tiny_run(ROOM, critic="exact")
    nn.init.normal_(critic[-1].weight, std=3.0)  # far apart: moves longer than 1 violate
    moves, pairs = metricrl.pair_counts(data, len(x))
    memory = {"mu": torch.tensor(3.0)}
    counts = moves, pairs, moves.nonzero().T
    loss, info, z = metricrl.critic_step(critic, x, data, counts, args, memory)
    assert z.shape == (len(x), len(x)) and info["violation"] > 0
    rise = metricrl.EXACT_DUAL_RATE * info["violation"]
    assert memory["mu"].item() == pytest.approx(min(3 + rise.item(), metricrl.EXACT_DUAL_MAX))
    assert loss.item() == pytest.approx(-info["push"].item() + 3 * info["violation"].item())


def test_learning_rate_schedules_by_hand():
    args = Args(steps=5, lr=0.01)
    rates = [metricrl.learning_rates(done, args, 2) for done in range(6)]
    assert [actor for _, actor in rates] == pytest.approx(
        [0.01, 0.01, 0.01, 0.01 * 2 / 3, 0.01 / 3, 0])  # 3 steps of the actor: to 0 at the end
    assert [critic for critic, _ in rates] == [0.01] * 6
    exact = Args(steps=5, critic="exact")
    assert [metricrl.learning_rates(done, exact, 2)[0] for done in range(5)] == pytest.approx(
        [0.2, 0.16, 0.12, 0.08, 0.04])


def test_training_follows_algorithm_1(monkeypatch):
    """The critic alone for critic_only of the steps, then both; each step's learning rates
    as the schedules say."""
    seen = []
    real_step = torch.optim.Adam.step

    def step(optimizer, *rest):
        seen.append([group["lr"] for group in optimizer.param_groups])
        return real_step(optimizer, *rest)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    env, args, data, x, critic, actor = tiny_run(ROOM, critic="exact", steps=5, critic_only=0.4,
                                                 eval_every=1, actor_batch=32)
    rows = metricrl.train(data, x, critic, actor, args)
    assert [("actor_loss" in row) for row in rows] == [False, False, True, True, True]
    assert all("critic_loss" in row for row in rows) and len(rows) == 5
    assert [critic_lr for critic_lr, _ in seen] == pytest.approx([0.2, 0.16, 0.12, 0.08, 0.04])
    assert [actor_lr for _, actor_lr in seen] == pytest.approx(
        [3e-3, 3e-3, 3e-3, 2e-3, 1e-3])


def test_logged_losses_average_only_the_steps_that_computed_them():
    """The actor starts at step 90 of 100: its logged loss is the mean of 10 steps, not 100."""
    logged = []
    for critic_only in (0.0, 0.9):
        _, args, data, x, critic, actor = tiny_run(
            ROOM, steps=100, critic_only=critic_only, eval_every=100, lr=0.0)
        rows = metricrl.train(data, x, critic, actor, args)  # lr 0: the losses stay put
        logged.append(rows[-1]["actor_loss"])
    assert logged[1] == pytest.approx(logged[0], rel=0.3)


def test_step_budget_grows_with_the_map_for_the_exact_critic_only():
    """--steps 0: 2,600, or 16 N for --critic exact on a map past 162 cells; six evaluations."""
    def budget(n, **knobs):
        args = metricrl.with_budgets(Args(**knobs), n, 4)
        return args.steps, args.eval_every

    assert budget(1274) == (2600, 500)  # the paper's critic: at its plateau by step 500
    assert budget(99, critic="exact") == (2600, 500)
    steps, every = budget(1274, critic="exact")
    assert (steps, every) == (16 * 1274, 16 * 1274 * 500 // 2600)
    assert len(range(every, steps, every)) + 1 == 6  # rows at 3,920 ... 19,600 and 20,384
    assert budget(1274, critic="exact", steps=100, eval_every=7) == (100, 7)
    assert budget(1274, critic="exact", steps=100) == (100, 500)


def test_actor_budget_grows_with_the_map():
    budgets = [metricrl.with_budgets(Args(), n, 4).actor_batch for n in (10, 99, 292, 1274)]
    assert budgets[:2] == [1024, 1024] and budgets[2] > 2 * 1024
    assert budgets[3] == 1274 ** 2 // 32 and budgets[3] / budgets[2] == pytest.approx(
        (1274 / 292) ** 2, rel=0.01)  # N^2 samples per step
    seen = []
    real = metricrl.sample

    def sample(data, n, *rest):
        seen.append(n)
        return real(data, n, *rest)

    with pytest.MonkeyPatch.context() as mp:  # 64 cells: the rule's floor; --actor-batch wins
        mp.setattr(metricrl, "sample", sample)
        for batch in (0, 300):
            _, args, data, x, critic, actor = tiny_run("open", steps=2, eval_every=2,
                                                       critic_only=0.0, actor_batch=batch)
            metricrl.train(data, x, critic, actor, args)
    assert seen == [1024, 1024, 300, 300]


# Ops that make the host wait for a CUDA device: a scalar read (.item(), if t:, float(t)), an
# output whose size depends on the values (nonzero, a boolean mask, unique, bincount, ...)
WAITS_FOR_THE_DEVICE = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "argwhere",
                        "masked_select", "masked_scatter", "_unique2", "unique_dim",
                        "unique_consecutive", "bincount", "repeat_interleave"}


class WaitWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """On the CPU, the ops that would synchronize on CUDA, while `on`."""
    def __init__(self):
        super().__init__()
        self.on, self.found = False, []

    def start(self):
        self.on = True

    def stop(self):
        self.on = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        masked = name.startswith("index") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in inputs)
        if self.on and (name in WAITS_FOR_THE_DEVICE or masked):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


SYNC_FREE_RUNS = [{}, {"critic": "exact"}, {"algo": "td"}, {"algo": "gcbc"}, {"critic": "bfs"},
                  {"super_state": True, "metric": "quasimetric"}, {"features": "xy"},
                  {"features": "image", "tile": 6, "channels": 4}, {"layout": "hypermaze2s5"},
                  {"goals": "random"}, {"slip": 0.2, "holdout": 0.2}]


def train_watched(monkeypatch, start, stop, device="cpu", layout=MAZE7, **knobs):
    """A tiny train() with stop() called before Progress.add() writes a row, start() after it:
    every step after the first, up to the last, runs between the two (a row does not)."""
    add = metricrl.Progress.add

    def watched_add(self, step, info):
        scored = step % self.args.eval_every == 0 or step == self.args.steps
        row = scored or time.time() - self.tick > 25  # a row: the host reads (30 s: add())
        if row:
            stop()
        add(self, step, info)
        if step < self.args.steps:
            start()

    monkeypatch.setattr(metricrl.Progress, "add", watched_add)
    env = GridWorld(layout)
    args = Args(episodes=20, episode_len=20, hidden=16, steps=30, eval_every=10, quiet=True,
                **knobs)
    data = metricrl.collect_dataset(env, args, np.random.default_rng(0))
    data = {key: column.to(device) for key, column in data.items()}
    x, critic, actor = metricrl.build(env, args, device)
    rows = metricrl.train(data, x, critic, actor, args, metricrl.ground_truth(env, args, device))
    stop()
    return rows


@pytest.mark.parametrize("knobs", SYNC_FREE_RUNS)
def test_training_steps_never_wait_for_the_device(monkeypatch, knobs):
    """What would stop a CUDA step until the host has read a value, checked on the CPU: no
    such op between two progress rows (the CUDA test below checks the device itself)."""
    watch = WaitWatch()
    with watch:
        rows = train_watched(monkeypatch, watch.start, watch.stop, **knobs)
    assert watch.found == [] and len(rows) == 3


def test_the_watch_sees_what_waits():
    watch = WaitWatch()
    t = torch.arange(5)
    with watch:
        t.nonzero(), t[t.argmax()[None]], t.cumsum(0)  # nothing yet: not on
        watch.start()
        t[t.argmax()[None]], t.cumsum(0), t.bincount()  # a (1,) index: no wait
        t[t > 2], t[t.argmax()], t.sum().item()  # a mask; a scalar index is read as an int
    assert watch.found == ["bincount", "index", "_local_scalar_dense", "_local_scalar_dense"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("knobs", SYNC_FREE_RUNS)
def test_cuda_training_steps_never_synchronize(monkeypatch, knobs):
    """torch's sync debug mode raises at any host synchronization between two rows."""
    def start():
        torch.cuda.set_sync_debug_mode("error")

    def stop():
        torch.cuda.set_sync_debug_mode("default")

    try:
        rows = train_watched(monkeypatch, start, stop, "cuda", **knobs)
    finally:
        stop()  # whatever happened, the next test runs in the default mode
    assert len(rows) == 3


def test_critic_learns_to_order_distances_on_a_tiny_map():
    _, args, data, x, critic, actor = tiny_run(ROOM, episodes=20, steps=300, critic_only=0.99,
                                               eval_every=100, hidden=64)
    rows = metricrl.train(data, x, critic, actor, args, truth(GridWorld(ROOM)))
    losses = [r["critic_loss"] for r in rows]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert rows[-1]["spearman"] > 0.8 and rows[-1]["monotonicity"] > 0.8


def test_critic_bfs_gives_the_optimal_policy_on_a_tiny_maze():
    """--critic bfs: the oracle's weights favour shortest-path moves; the actor learns them."""
    env, args, data, x, critic, actor = tiny_run(MAZE7, critic="bfs", steps=400,
                                                 eval_every=400, hidden=64)
    d = torch.as_tensor(np.array(env.distance_matrix())).float()
    s, a, s2 = data["s"], data["a"], data["s2"]
    g = torch.randint(len(env.cells), s.shape)
    w = metricrl.actor_weights(critic, x, None, s, s2, g, args)
    on_path = torch.as_tensor(np.array(env.optimal_actions()))[s, g, a]
    assert w[on_path].min() > 10 * w[~on_path].max()
    rows = metricrl.train(data, x, critic, actor, args, truth(env))
    assert "critic_loss" not in rows[-1] and "actor_loss" in rows[-1]  # the actor from step 1
    assert rows[-1]["optimal_action_rate"] == 1.0 and rows[-1]["success_rate"] == 1.0
    assert rows[-1]["critic_success_rate"] == 1.0 and rows[-1]["spearman"] == pytest.approx(1.0)


def test_critic_bfs_puts_a_goal_out_of_reach_farthest_not_nearest():
    """A pair with no path was -1 in the oracle's table, the nearest of all: the advantage of a
    move into a cell the goal cannot be reached from was d + 1, and the critic's own greedy
    policy walked there. Now such a pair is N away."""
    env, args, data, x, critic, actor = tiny_run("#####\n#.>.#\n#####", critic="bfs")
    d = torch.as_tensor(np.array(env.distance_matrix()))  # past the arrow, the left is gone
    dz = metricrl.critic_distances(critic, x, args)
    assert d[1, 0] == d[2, 0] == -1 and (dz[d < 0] == len(env.cells)).all()
    assert torch.equal(dz[d >= 0], d[d >= 0].float())
    s, s2, g = torch.tensor([0]), torch.tensor([1]), torch.tensor([0])  # a step off the goal
    assert metricrl.actor_weights(critic, x, None, s, s2, g, args).item() < 1  # A = 0 - 1


def trained_distances(layout, seed=0, **knobs):
    """A critic trained alone on a tiny map (after the data is collected, the map's BFS answers
    raise: the critic learns from the data alone), its distances and BFS's."""
    env, args, data, x, critic, actor = tiny_run(layout, seed, episodes=40, critic_only=0.99,
                                                 **knobs)
    d = torch.as_tensor(np.array(env.distance_matrix())).float()
    for name in ("distance_matrix", "optimal_actions", "transitions"):
        setattr(env, name, None)  # calling it would raise
    metricrl.train(data, x, critic, actor, args)
    return metricrl.critic_distances(critic, x, args), d


def test_quasimetric_paper_loss_learns_the_long_way_back():
    dz, d = trained_distances(ONE_WAY_RING, steps=600, metric="quasimetric", hidden=64, lr=1e-2)
    assert dz[0, 2] < dz[2, 0] - 1  # 2 steps there, 6 back
    assert metricrl.spearman(dz[d > 0], d[d > 0].double()) > 0.9


@pytest.mark.parametrize("layout", [RING, "#####\n#...#\n#...#\n#####", ONE_WAY_RING])
def test_exact_critic_learns_bfs_distances(layout):
    """On a ring, a room and a ring with a one-way cell: within 0.1 of BFS on every pair."""
    dz, d = trained_distances(layout, steps=600, critic="exact", hidden=16)
    assert (dz - d).abs().max() < 0.1
    assert (dz.diagonal() == 0).all()


def test_td_critic_orders_distances_on_a_tiny_map():
    dz, d = trained_distances(ROOM, steps=400, algo="td", hidden=64, epsilon=0.0)
    assert metricrl.spearman(dz[d > 0], d[d > 0].double()) > 0.8


# ------------------------------------------------------------------ 7. evaluation
def test_ground_truth_is_the_maps():
    env = GridWorld(ONE_WAY_RING)
    t = truth(env)
    assert t["nxt"].tolist() == env.transitions().tolist()
    assert t["d"].tolist() == env.distance_matrix().tolist()
    assert "opt" not in t  # no (N, N, A) table: optimal_rate() checks one action a pair


def test_policy_table_in_chunks_equals_one_pass():
    env = GridWorld("rooms")
    torch.manual_seed(0)
    x, _, actor = metricrl.build(env, Args(hidden=16), "cpu")
    whole = metricrl.pair_table(actor, x, chunk=len(x) ** 2).argmax(-1)
    assert (metricrl.pair_table(actor, x, chunk=1000).argmax(-1) == whole).all()
    n = len(x)
    s, g = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    assert (whole.flatten() == actor(x, s, g).argmax(-1)).all()


def test_critic_distances_of_each_critic():
    env, args, _, x, critic, _ = tiny_run(ONE_WAY_RING)
    z = critic(x)
    assert torch.allclose(metricrl.critic_distances(critic, x, args), torch.cdist(z, z))
    env, args, _, x, critic, _ = tiny_run(ONE_WAY_RING, critic="exact", super_state=True)
    z = critic(x)  # without the super-state's row
    expected = (z[:, None, :] - z[None, :, :]).relu().amax(-1)  # [s, g] = max relu(z(s) - z(g))
    assert torch.allclose(metricrl.critic_distances(critic, x, args), expected)
    env, args, _, x, critic, _ = tiny_run(ONE_WAY_RING, algo="td")
    v = metricrl.pair_table(critic, x)[..., 0]
    assert torch.allclose(metricrl.critic_distances(critic, x, args),
                          torch.log(v.clamp(1e-6, 1)) / np.log(args.gamma))
    assert metricrl.critic_distances(None, x, Args(algo="gcbc")) is None


def full_rollout(table, nxt, limit):
    """Reference: every pair walks all `limit` steps (or until it arrives), no shortcuts."""
    n = len(table)
    pos, goal = torch.arange(n)[:, None].expand(n, n), torch.arange(n).expand(n, n)
    done, steps = pos == goal, torch.zeros(n, n, dtype=torch.long)
    for _ in range(limit):
        pos = torch.where(done, pos, nxt[pos, table[pos, goal]])
        steps += ~done
        done = done | (pos == goal)
    return done, steps


def test_rollout_counts_loops_as_failures():
    env = GridWorld(RING)
    nxt = torch.as_tensor(np.array(env.transitions()))
    table = torch.ones(10, 10, dtype=torch.long)  # always right
    reached, steps = metricrl.rollout(table, nxt, 1000)
    assert not reached[0, 4] and reached[0, 3] and steps[0, 3] == 3  # (0,0) -> (0,3)


@pytest.mark.parametrize("layout", ["rooms", "maze"])
def test_early_stopped_rollouts_match_full_length_ones(layout):
    env = GridWorld(layout)
    nxt = torch.as_tensor(np.array(env.transitions()))
    opt = torch.as_tensor(np.array(env.optimal_actions()))
    torch.manual_seed(0)
    noisy = torch.where(torch.rand(opt.shape[:2]) < 0.1, torch.randint(4, opt.shape[:2]),
                        opt.float().argmax(-1))  # mostly optimal: long paths and loops
    for table in (noisy, torch.randint(4, opt.shape[:2])):
        reached, steps = metricrl.rollout(table, nxt, 300)
        ref_reached, ref_steps = full_rollout(table, nxt, 300)
        assert (reached == ref_reached).all() and (steps[reached] == ref_steps[reached]).all()
        assert 0.01 < reached.float().mean() < 0.99  # both outcomes occur


def test_slip_in_data_and_seeded_rollouts():
    env = GridWorld("open")
    slipped = metricrl.collect_dataset(env, Args(episodes=50, slip=0.3), np.random.default_rng(0))
    intended = torch.as_tensor(np.array(env.transitions()))[slipped["s"], slipped["a"]]
    assert 0.15 < (intended != slipped["s2"]).float().mean() < 0.35
    t = truth(env)
    table = opt_table(env).float().argmax(-1)  # an optimal policy table
    exact, _ = metricrl.rollout(table, t["nxt"], 1000)
    assert exact[t["d"] > 0].all()
    a, steps_a = metricrl.rollout(table, t["nxt"], 1000, slip=0.3, seed=1)
    b, steps_b = metricrl.rollout(table, t["nxt"], 1000, slip=0.3, seed=1)
    assert (a == b).all() and (steps_a == steps_b).all()  # seeded
    # a slip that brings a pair back where it was is no loop: the pair walks on and arrives
    assert a[t["d"] > 0].float().mean() > 0.99
    ok = a & (t["d"] > 0)
    assert (steps_a[ok] > t["d"][ok]).any()  # slips cost steps


def test_spearman_and_monotonicity_by_hand():
    d = torch.as_tensor(np.array(GridWorld("maze").distance_matrix())).long()
    pairs = d > 0
    assert metricrl.spearman(d[pairs].double(), d[pairs].double()) == pytest.approx(1.0)
    assert metricrl.monotonicity(d.double(), d) == 1.0
    assert metricrl.monotonicity(-d.double(), d) == 0.0
    assert metricrl.monotonicity(torch.ones(d.shape), d) == 0.0  # a tie keeps no order
    x, y = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert metricrl.spearman(x, y) == pytest.approx(0.9 ** 0.5)  # ties share rank 2.5
    assert metricrl.spearman(x, -y) == pytest.approx(-(0.9 ** 0.5))


@pytest.mark.parametrize("layout", ["oneway", "hypermaze3s5"])
def test_optimal_rate_agrees_with_the_whole_table_of_optimal_actions(layout):
    """One action a pair, d(next(s, a), g) = d(s, g) - 1, against the (N, N, A) table."""
    env = GridWorld(layout)
    t, opt = truth(env), opt_table(env)
    torch.manual_seed(0)
    tables = [torch.randint(len(env.moves), opt.shape[:2]), opt.float().argmax(-1)]
    for table, mask in zip(tables, [t["d"] > 0, t["d"] > 1]):
        expected = opt.gather(2, table[..., None])[..., 0][mask].double().mean().item()
        assert metricrl.optimal_rate(table, t, mask) == expected
    assert metricrl.optimal_rate(tables[1], t, t["d"] > 0) == 1.0


def test_metrics_of_optimal_random_and_looping_policies_and_distance_errors():
    env = GridWorld("rooms")
    t = truth(env)
    x = metricrl.build(env, Args(), "cpu")[0]
    d = t["d"].float()
    opt = opt_table(env).float()
    optimal = metricrl.evaluate(d, TableActor(opt), x, t)  # and BFS's distances
    assert optimal["success_rate"] == 1.0 and optimal["path_ratio"] == 1.0
    assert optimal["optimal_action_rate"] == 1.0 and optimal["critic_success_rate"] == 1.0
    assert optimal["distance_error"] == 0 and optimal["distance_error_max"] == 0
    off = d + 0.25 * (d > 0)  # every pair a quarter step too far: the same greedy policy
    off[0, 1] += 2  # one pair far off
    off = metricrl.evaluate(off, TableActor(opt), x, t)
    n = (d > 0).sum().item()
    assert off["distance_error"] == pytest.approx(0.25 + 2 / n) and off["distance_error_max"] == 2.25
    torch.manual_seed(0)
    random = metricrl.evaluate(-d, TableActor(torch.randn(opt.shape)), x, t)
    assert random["success_rate"] < 0.5 and random["optimal_action_rate"] < 0.7
    assert random["critic_success_rate"] < 0.1 and random["value_greedy_rate"] < 0.05
    up = torch.zeros(opt.shape)
    up[..., 0] = 1  # always up: stuck at the top wall, never reaches a goal below
    looping = metricrl.evaluate(None, TableActor(up), x, t)
    assert looping["success_rate"] < 0.5 and np.isnan(looping["critic_success_rate"])


def test_seen_and_unseen_metrics_count_exactly_their_pairs():
    """Optimal, except towards a held-out goal: always up (there the critic is flat: up too)."""
    env = GridWorld("rooms")
    t = truth(env, holdout=0.1)
    held = env.held_out(0.1, 0)
    d = t["d"].numpy()
    assert (t["unseen"].numpy() == held[:, None] | held[None, :]).all()
    policy = opt_table(env).float()
    policy[:, held] = torch.tensor([1.0, 0, 0, 0])  # (N, N_held, 4): up
    dz = t["d"].float().clone()
    dz[:, held] = 0
    x = metricrl.build(env, Args(), "cpu")[0]
    m = metricrl.evaluate(dz, TableActor(policy), x, t)
    reached = 0  # the unseen pairs an independent walk reaches
    nxt = env.transitions()
    for s, g in zip(*np.nonzero((held[:, None] | held[None, :]) & (d > 0))):
        if not held[g]:
            reached += 1  # one move from a held-out start, then optimal
            continue
        while nxt[s, 0] != s and s != g:
            s = nxt[s, 0]
        reached += s == g
    unseen = ((held[:, None] | held[None, :]) & (d > 0)).sum()
    assert m["success_seen"] == 1.0 and m["critic_success_seen"] == 1.0
    assert m["success_unseen"] == pytest.approx(reached / unseen)
    assert m["critic_success_unseen"] == pytest.approx(reached / unseen)
    assert 0 < reached < unseen
    plain = metricrl.evaluate(dz, TableActor(policy), x, truth(env))
    assert np.isnan(plain["success_unseen"]) and plain["success_seen"] == plain["success_rate"]


@pytest.mark.parametrize("features, knobs", [("image", ["--tile", "3"]),
                                             ("xy", ["--fourier", "2"])])
def test_a_tiny_map_learns_from_observations(tmp_path, features, knobs):
    """Images and coordinates, a few hundred steps: far better than chance (0.1 on MAZE7)."""
    path = tmp_path / "maze7.txt"
    path.write_text(MAZE7)
    m = metricrl.main(["--env", str(path), "--features", features, *knobs, "--steps", "300",
                       "--episodes", "30", "--hidden", "64", "--quiet",
                       "--holdout", "0.1", "--out", str(tmp_path / "run")])
    assert m["critic_success_rate"] > 0.6 and m["success_rate"] > 0.5
    assert 0 <= m["success_unseen"] <= 1 and m["flags"]["features"] == features


# ------------------------------------------------------------------ a run end to end
def test_time_left_is_the_mean_step_since_the_actor_began(monkeypatch):
    """No time left while the critic trains alone; then the steps left times the mean time of a
    step since the actor's first (a slow stretch then a fast one: not the last rows' speed)."""
    clock, said = [0.0], []

    def now():
        return clock[0]

    def report(row, args, minutes_left=None):
        said.append(minutes_left)

    monkeypatch.setattr(metricrl.time, "time", now)
    monkeypatch.setattr(metricrl, "report", report)
    log = metricrl.Progress(Args(steps=100, eval_every=10), None, None, None, None)
    loss = torch.tensor(1.0)
    for step in range(1, 61):
        info = {"critic_loss": loss}
        if step > 20:  # the actor's steps: 1 s each up to step 50, then 0.1 s
            info["actor_loss"] = loss
        clock[0] += 0.1 if step <= 20 or step > 50 else 1.0
        log.add(step, info)
    assert said[:2] == [None, None]  # steps 10 and 20: the critic alone
    per_step = (29 * 1.0 + 10 * 0.1) / 39  # steps 22 to 60: timed from the actor's first
    assert said[-1] == pytest.approx(40 * per_step / 60)  # 40 steps left, in minutes


def test_the_figure_draws_moves_above_the_cells_and_the_actor_on_its_own_axis(tmp_path,
                                                                              monkeypatch):
    drawn, savefig = [], metricrl.Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn.append(fig)
        savefig(fig, *args, **kwargs)

    monkeypatch.setattr(metricrl.Figure, "savefig", keep)
    metricrl.main(["--env", tiny_map(tmp_path), "--out", str(tmp_path / "a"), *TINY])
    axes = {ax.get_title(): ax for ax in drawn[0].axes}
    phi = next(ax for title, ax in axes.items() if title.startswith("φ(s)"))
    assert phi.collections[0].get_zorder() > phi.collections[1].get_zorder()  # moves, cells
    losses = axes["Losses (means since the last point)"]
    same_place = [ax for ax in drawn[0].axes if ax.bbox.bounds == losses.bbox.bounds]
    actor = [ax for ax in same_place if ax is not losses]  # its twin
    assert [line.get_label() for line in actor[0].lines] == ["actor_loss"]
    assert "actor_loss" not in [line.get_label() for line in losses.lines]


def test_end_to_end_outputs_reload_and_same_seed(tmp_path):
    env = tiny_map(tmp_path)
    m1 = metricrl.main(["--env", env, "--out", str(tmp_path / "a"), *TINY])
    for name in ("metrics.json", "log.csv", "model.pt", "metricrl.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for key in (*metricrl.METRICS, "seconds", "dataset"):
        assert key in saved
    assert saved["env"] == env and saved["steps"] == 60 and saved["device"] == "cpu"
    assert (tmp_path / "a" / "log.csv").read_text().count("\n") == 3  # header + 2 evaluations
    m2 = metricrl.main(["--env", env, "--out", str(tmp_path / "b"), *TINY])
    timing = ("seconds", "train_steps_per_s", "flags")

    def drop(metrics):
        return {k: v for k, v in metrics.items() if k not in timing}

    assert drop(m1) == drop(m2)
    agent = experiments.Agent(str(tmp_path / "a" / "model.pt"))  # the checkpoint, its flags
    assert agent.args.steps == 60 and agent.args.env == env
    truth = metricrl.ground_truth(agent.env, agent.args, "cpu")
    dz = metricrl.critic_distances(agent.critic, agent.x, agent.args)
    again = metricrl.evaluate(dz, agent.actor, agent.x, truth)  # the same metrics, reloaded
    assert all(again[key] == pytest.approx(m1[key], nan_ok=True) for key in metricrl.METRICS)
    states, goals = np.array([[1, 1], [3, 5], [1, 3]]), np.array([[3, 5], [1, 1], [3, 1]])
    s, g = agent.env.cell_indices(states), agent.env.cell_indices(goals)
    table = metricrl.pair_table(agent.actor, agent.x).argmax(-1)  # the greedy policy
    assert agent.act(states, goals).tolist() == table[s, g].tolist()
    with pytest.raises(ValueError, match="not a free cell"):
        agent.act(np.array([[0, 0]]), np.array([[1, 1]]))


def test_metrics_json_holds_the_training_speed(tmp_path):
    out = tmp_path / "bench"
    metricrl.main(["--env", tiny_map(tmp_path), "--steps", "5", "--episodes", "10",
                   "--episode-len", "20", "--hidden", "16", "--quiet", "--out", str(out)])
    bench = json.loads((out / "metrics.json").read_text())
    assert bench["device"] == "cpu" and bench["train_steps_per_s"] > 0


@pytest.mark.parametrize("algo, epsilon", [("metricrl", "0"), ("metricrl", "1"), ("gcbc", "0"),
                                           ("td", "0")])
def test_every_method_learns_from_expert_data_on_a_tiny_map(tmp_path, algo, epsilon):
    """(and the default, metricrl, from random data)"""
    env = gridworld.GridWorld(ROOM)
    m = metricrl.main(["--env", tiny_map(tmp_path), "--algo", algo, "--epsilon", epsilon,
                       "--steps", "300", "--eval-every", "300", "--episodes", "50",
                       "--episode-len", "30", "--hidden", "64", "--quiet",
                       "--out", str(tmp_path / algo)])
    opt, d = env.optimal_actions(), env.distance_matrix()
    chance = opt.mean(-1)[d > 0].mean()  # a uniformly random action's optimal-action rate
    assert m["algo"] == algo and (tmp_path / algo / "metrics.json").exists()
    assert m["optimal_action_rate"] > chance + 0.2 and m["success_rate"] > 0.3
    assert np.isnan(m["critic_success_rate"]) == (algo == "gcbc")


def no_figure(folder, *rest):
    """plot_run's stand-in where a test runs many runs and another test checks the figure."""
    (Path(folder) / "metricrl.png").write_bytes(b"")


def test_exercises_run_as_written(tmp_path, monkeypatch):
    """Every command of docs/exercises.md runs with the knobs it names (few steps here)."""
    monkeypatch.setattr(metricrl, "plot_run", no_figure)
    text = (Path(HERE) / "docs" / "exercises.md").read_text(encoding="utf-8")
    section = text.split("## For teachers")[0]
    commands = [line.strip() for line in section.splitlines()
                if line.strip().startswith("python metricrl.py ")]
    assert 6 <= len(re.findall(r"^## \d+\. ", section, re.M)) <= 12 and len(commands) >= 8
    for i, command in enumerate(commands):
        argv = shlex.split(command)[2:]
        metrics = metricrl.main([*argv, "--steps", "30", "--eval-every", "30", "--quiet",
                                 "--out", str(tmp_path / str(i))])
        written, given = metricrl.parse_args(argv, Args)
        for name in given - {"out"}:  # the run used each knob the exercise names
            assert metrics["flags"][name] == getattr(written, name), command
        assert metrics["flags"]["steps"] == 30 and metrics["env"] == written.env


# ------------------------------------------------------------------ the command line
@pytest.mark.parametrize("flags, message", [
    (["--env", "castle"], "unknown layout 'castle'"),
    (["--env", "BADMAP"], "unknown character"),
    (["--steps", "-1"], "--steps must be 0 or more"),
    (["--episodes", "-3"], "--episodes must be 0 or more"),
    (["--epsilon", "1.5"], "--epsilon must be in [0, 1]"),
    (["--out", "FILE/sub"], "cannot write there"),
    (["--features", "pixels"], "argument --features: invalid choice: 'pixels'"),
    (["--algo", "sac"], "argument --algo: invalid choice: 'sac'"),
    (["--compare"], "unrecognized arguments: --compare"),  # a sweep: experiments.py
    (["--slip", "2"], "--slip must be in [0, 1], got 2.0"),
    (["--algo", "td", "--metric", "quasimetric"], "--metric, --critic are MetricRL's"),
    (["--algo", "gcbc", "--critic", "bfs"], "--critic are MetricRL's: use --algo metricrl"),
    (["--critic", "exact", "--metric", "quasimetric"], "--critic exact has its own geometry"),
    (["--critic", "exact", "--lam", "2"], "drop --metric, --latent, --lam"),
    (["--algo", "td", "--gamma", "1"], "td needs --gamma below 1"),
    (["--env", "hypermaze3s5", "--features", "image"], "an image shows a 2-D map's cells"),
    (["--env", "doorkey", "--features", "image"], "doorkey's states have 4 coordinates"),
    (["--env", "doorkey", "--holdout", "0.1"], "no cell of doorkey can be held out"),
    (["--env", "hypermaze1"], "--env: hypermaze1: a hypermaze needs d >= 2"),
    (["--env", "hypermaze999999999"], "a hypermaze needs d >= 2"),  # refused at once
    (["--episodes", "200000"], "--episodes must be at most 2^24 / T"),
    (["--env", "hypermaze3s30"], "GB of memory; this cpu has"),  # 27,000 cells: refused first
    (["--algo", "gcbc", "--actions", "all"], "gcbc has none"),
    (["--steps", "many"], "invalid int value"),
    (["--seed", "-1"], "--seed must be 0 or more"),
    (["--lr", "nan"], "--lr must be positive"),
    (["--critic-only", "1"], "--critic-only must be in [0, 1)"),
    (["--gamma", "0"], "--gamma must be in (0, 1]"),
    (["--expectile", "1"], "--expectile must be in (0, 1)"),
    (["--latent", "1"], "--latent must be 2 or more"),
    (["--env", "SPLITMAP"], "no free cell can reach another one"),
    (["--device", ""], "--device : here auto, cpu"),
    (["--seed", "99999999999999999999"], "--seed must be below 2^31"),
    (["--beta", "inf"], "--beta must be finite"),
    (["--hidden", "100000"], "GB of memory; this cpu has"),
    (["--env", "maze1001"], "GB of memory; this cpu has"),
    (["--features", "image", "--tile", "60"], "GB of memory; this cpu has"),
    (["--features", "image", "--channels", "20000"], "GB of memory; this cpu has"),
    (["--features", "image", "--env", "maze51", "--tile", "6"], "GB of memory"),
    (["--features", "image", "--tile", "0"], "--tile must be positive"),
    (["--features", "image", "--env", "open", "--tile", "1"], "the CNN needs 17: --tile 2"),
    (["--holdout", "1"], "--holdout must be in [0, 1)"),
    (["--features", "xy", "--fourier", "-1"], "--fourier must be in 0..16"),
    (["--features", "xy", "--fourier", "40"], "--fourier must be in 0..16"),
    (["--holdout", "-0.1"], "--holdout must be in [0, 1)"),
    (["--holdout", "0.99"], "leaves no move to learn from"),
    (["--data", "one-direction", "--algo", "gcbc"], "no hindsight goals"),
    (["--data", "one-direction", "--super-state"], "and no --super-state"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, flags, message):
    assert_one_line_error(metricrl.main, tmp_path, capsys, flags, message)


def assert_one_line_error(main, tmp_path, capsys, flags, message):
    """main(flags) exits with code 2 and one line on stderr that holds message."""
    bad_map, a_file, split = tmp_path / "bad.txt", tmp_path / "file", tmp_path / "split.txt"
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    bad_map.write_text("#..#\n#.x#")
    split.write_text("#####\n#.#.#\n#####")
    a_file.write_text("not a checkpoint")
    places = {"BADMAP": bad_map, "FILE": a_file, "EMPTY": tmp_path / "empty.pt",
              "TENSOR": tmp_path / "tensor.pt", "SPLITMAP": split}
    for word, path in places.items():
        flags = [flag.replace(word, str(path)) for flag in flags]
    if "--out" not in flags:
        flags = [*flags, "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.replace(str(tmp_path / "empty.pt"), "EMPTY")
    assert message in err and err.count("\n") == 1


def test_bad_input_from_the_shell_has_no_traceback():
    result = subprocess.run([sys.executable, "metricrl.py", "--epsilon", "2"], cwd=HERE,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "metricrl.py: error: --epsilon must be in [0, 1], got 2.0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_fails_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        metricrl.main(["--device", "cuda", "--quiet"])
    assert exit_info.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_matches_cpu_closely(tmp_path):
    env = tiny_map(tmp_path)
    flags = ["--env", env, *TINY, "--steps", "200", "--eval-every", "100"]
    cpu = metricrl.main([*flags, "--device", "cpu", "--out", str(tmp_path / "cpu")])
    gpu = metricrl.main([*flags, "--device", "cuda", "--out", str(tmp_path / "gpu")])
    assert gpu["device"].startswith("cuda")
    assert abs(gpu["monotonicity"] - cpu["monotonicity"]) < 0.1


def test_help_lists_every_knob_with_its_comment(capsys):
    with pytest.raises(SystemExit) as exit_info:
        metricrl.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--super-state" in out and "0: 2,600 (--critic" in out
    assert "behaviour: random action with this probability" in out  # Args' comment on epsilon


def test_a_knob_without_a_comment_still_has_a_flag():
    """A student adds a knob and forgets its comment: --help and parsing still work."""
    @dataclasses.dataclass
    class MoreArgs(Args):
        width_scale: float = 1.0
    args, given = metricrl.parse_args(["--width-scale", "2", "--steps", "7"], MoreArgs)
    assert args.width_scale == 2.0 and args.steps == 7 and given == {"width_scale", "steps"}
    with pytest.raises(SystemExit) as exit_info:
        metricrl.parse_args(["--help"], MoreArgs)
    assert exit_info.value.code == 0


def test_default_folder_names_what_differs_from_the_defaults(tmp_path, monkeypatch):
    assert metricrl.run_name(Args()) == "maze-metricrl-s0"
    assert metricrl.run_name(Args(algo="gcbc", epsilon=0.5, super_state=True, seed=2)) == \
        "maze-gcbc-epsilon=0.5-super-state-s2"
    monkeypatch.chdir(tmp_path)
    for eps in ("0", "1"):  # the second run does not replace the first
        metricrl.main(["--env", tiny_map(tmp_path), *TINY, "--epsilon", eps])
    data, rest = "episodes=20-episode-len=30", "hidden=32-steps=60-eval-every=30"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        f"room-metricrl-{data}-epsilon=0-{rest}-s0", f"room-metricrl-{data}-{rest}-s0"]


def test_a_failed_run_leaves_the_folder_as_it_was(tmp_path, capsys):
    out = tmp_path / "d"
    metricrl.main(["--env", tiny_map(tmp_path), *TINY, "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as exit_info:  # diverges: nan losses
        metricrl.main(["--env", tiny_map(tmp_path), *TINY, "--lr", "1e10", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1 and "diverged" in err and "--lr" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing mixed, no leftovers


def test_a_second_run_into_a_folder_replaces_every_file(tmp_path):
    out = tmp_path / "d"
    metricrl.main(["--env", tiny_map(tmp_path), *TINY, "--out", str(out)])
    metricrl.main(["--env", tiny_map(tmp_path), *TINY, "--algo", "gcbc", "--steps", "30",
                   "--out", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert saved["algo"] == ckpt["args"]["algo"] == "gcbc" and ckpt["args"]["steps"] == 30
    assert (out / "log.csv").read_text().count("\n") == 2
    assert sorted(p.name for p in out.iterdir()) == list(sorted(metricrl.OUTPUTS))


def interruptible():
    """Ctrl-C's default in the child, even where the tests run with it ignored (in the
    background, under some runners): Python then turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def shell(script, args, tmp_path, **kw):
    """A script in a subprocess, as a user's shell would start it."""
    if os.name == "posix":
        kw["preexec_fn"] = interruptible
    return subprocess.Popen([sys.executable, os.path.join(HERE, script), *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_two_runs_at_once_into_one_folder_never_mix(tmp_path):
    runs = [shell("metricrl.py", ["--env", tiny_map(tmp_path), *TINY, "--algo", algo, "--out", "d"],
                  tmp_path) for algo in ("metricrl", "gcbc")]
    assert [run.wait(timeout=120) for run in runs] == [0, 0]
    saved = json.loads((tmp_path / "d" / "metrics.json").read_text())
    ckpt = torch.load(tmp_path / "d" / "model.pt", weights_only=True)
    log = (tmp_path / "d" / "log.csv").read_text()
    assert saved["algo"] == ckpt["args"]["algo"] and ckpt["history"][-1]["step"] == 60
    assert ("critic_loss" in log) == (saved["algo"] == "metricrl")  # gcbc logs no critic loss
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == list(sorted(metricrl.OUTPUTS))


def test_a_closed_stdout_does_not_stop_the_run(tmp_path):
    """python metricrl.py ... | head -1: the run goes on and saves its results."""
    run = shell("metricrl.py", ["--env", tiny_map(tmp_path), *TINY[:-1], "--out", "p"], tmp_path)
    run.stdout.readline()
    run.stdout.close()  # what head does after one line
    assert run.wait(timeout=120) == 0 and "Traceback" not in run.stderr.read()
    assert (tmp_path / "p" / "metrics.json").exists()


def test_agent_act_rejects_cells_of_the_wrong_type_or_shape(tmp_path):
    metricrl.main(["--env", tiny_map(tmp_path), *TINY, "--out", str(tmp_path / "a")])
    agent = experiments.Agent(str(tmp_path / "a" / "model.pt"))
    with pytest.raises(TypeError, match="integer"):
        agent.act([[1.5, 2.2]], [[1, 1]])
    with pytest.raises(ValueError, match=r"shape \(2,\) or \(B, 2\)"):
        agent.act(np.ones((2, 3), dtype=int), [[1, 1]])
    assert agent.act([[1, 1], [3, 5]], [3, 5]).shape == (2,)  # one goal for both states


# ===================================================================== experiments.py
def test_observations_of_another_algo_go_to_a_folder_of_their_own(tmp_path, monkeypatch):
    """--observations --algo td: a folder beside the default sweep's, not over it, and no
    one-direction rows (td's hindsight goals need whole trajectories); run() replaced."""
    runs = []

    def fake_run(cell):
        runs.append(cell)
        metrics = {"success_rate": 0.5, "critic_success_rate": 0.4, "seconds": 1.0,
                   "device": "cpu", "flags": dataclasses.asdict(cell)}
        os.makedirs(cell.out)
        with open(os.path.join(cell.out, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f)
        return metrics

    monkeypatch.setattr(metricrl, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    experiments.main(["--observations", "--seeds", "1", "--quiet"])
    assert len(runs) == 22 and {cell.algo for cell in runs} == {"metricrl"}
    runs.clear()
    experiments.main(["--observations", "--seeds", "1", "--quiet", "--algo", "td"])
    assert len(runs) == 18 and {cell.algo for cell in runs} == {"td"}
    assert {cell.data for cell in runs} == {"all"}
    assert sorted(os.listdir(tmp_path / "runs")) == ["observations", "observations-td"]
    for folder in ("observations", "observations-td"):
        assert (tmp_path / "runs" / folder / "observations.md").exists()


def test_compare_writes_table_and_figure_and_resumes(tmp_path, capsys):
    flags = ["--compare", "--env", tiny_map(tmp_path), "--algos", "metricrl,gcbc",
             "--epsilons", "0,1", "--seeds", "1", *TINY, "--out", str(tmp_path / "cmp")]
    experiments.main(flags)
    table = (tmp_path / "cmp" / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| room")]
    assert len(rows) == 4 and all(re.search(r"\| [01]\.\d{3} \|", row) for row in rows)
    assert "±" not in table  # one seed: no spread to show
    assert sum(row.count("—") for row in rows) == 4  # gcbc has no critic: 2 rows x 2 columns
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp").glob("*/metrics.json")}
    assert len(first) == 4
    assert {p.parent.name for p in first} == {  # each row's knobs
        "room-metricrl-epsilon=0-s0", "room-metricrl-s0", "room-gcbc-epsilon=0-s0", "room-gcbc-s0"}
    assert all(json.loads(p.read_text())["flags"]["steps"] == 60 for p in first)  # and all's
    capsys.readouterr()
    experiments.main(flags)  # the same grid again: nothing new runs
    assert "4 done before" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp").glob("*/metrics.json")} == first
    experiments.main(flags[:-2] + ["--steps", "40", "--out", str(tmp_path / "cmp")])  # new flags
    assert all(p.stat().st_mtime_ns != first[p] for p in first)


def test_compare_rows_are_every_map_method_and_epsilon(tmp_path):
    (tmp_path / "ring.txt").write_text(RING)
    envs = f"open,{tmp_path / 'ring.txt'}"
    args = experiments.SweepArgs(algos="gcbc, td,gcbc", epsilons="1,.5", envs=envs)
    rows = experiments.compare_rows(args)
    assert [label for label, _ in rows] == [
        ("open", "gcbc", "1"), ("open", "gcbc", "0.5"), ("open", "td", "1"), ("open", "td", "0.5"),
        ("ring", "gcbc", "1"), ("ring", "gcbc", "0.5"), ("ring", "td", "1"), ("ring", "td", "0.5")]
    assert rows[2][1] == {"env": "open", "algo": "td", "epsilon": 1.0}


def test_assumptions_writes_every_row_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metricrl, "plot_run", no_figure)
    flags = ["--assumptions", "--seeds", "1", "--steps", "20", "--eval-every", "20",
             "--episodes", "10", "--hidden", "16", "--quiet", "--out", str(tmp_path / "a")]
    experiments.main(flags)
    table = (tmp_path / "a" / "assumptions.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assumptions = experiments.assumption_rows()
    assert len(rows) == 1 + len(assumptions)  # header + one row per variant
    assert (tmp_path / "a" / "assumptions.png").stat().st_size > 0
    distinct = {tuple((k, v) for k, v in knobs.items() if v != getattr(Args(), k))
                for _, knobs in assumptions}  # slip 0 is the default run
    folders = {p.parent.name for p in (tmp_path / "a").glob("*/metrics.json")}
    assert len(folders) == len(distinct)
    assert {"oneway-metricrl-metric=quasimetric-s0", "rooms-metricrl-data=split-super-state-s0",
            "maze-metricrl-slip=0.3-s0"} <= folders
    capsys.readouterr()
    experiments.main(flags)
    assert f"{len(assumptions)} done before" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--compare", "--algos", "metricrl,sac"], "--algos: unknown 'sac'"),
    (["--compare", "--algos", ","], "--algos: unknown ''"),
    (["--compare", "--epsilons", "0,x"], "--epsilons must be numbers in [0, 1]"),
    (["--compare", "--algos", "metricrl,metricrl-cosh"], "--algos: unknown 'metricrl-cosh'"),
    (["--compare", "--epsilons", "0,2"], "--epsilons must be numbers in [0, 1], got '0,2'"),
    (["--compare", "--critic", "exact"], "--critic: --compare sets it in each row"),
    (["--compare", "--algo", "td"], "--algo: --compare sets it in each row"),
    (["--assumptions", "--critic", "exact"], "--critic: --assumptions sets it in each row"),
    (["--assumptions", "--env", "rooms"], "--env: --assumptions sets it in each row"),
    (["--compare", "--envs", "maze,castle"], "unknown layout 'castle'"),
    (["--compare", "--algos", "td", "--gamma", "1"], "td needs --gamma"),
    (["--compare", "--assumptions"], "--compare and --assumptions are two modes"),
    (["--steps", "5"], "give --compare, --assumptions, --observations, --scaling or --continuous"),
    (["--compare", "--seeds", "0"], "--seeds must be positive, got 0"),
    (["--compare", "--steps", "-5"], "--steps must be 0 or more"),
])
def test_bad_sweep_input_exits_2_with_one_line(tmp_path, capsys, flags, message):
    assert_one_line_error(experiments.main, tmp_path, capsys, flags, message)


def test_a_damaged_metrics_json_is_run_again(tmp_path, capsys):
    flags = ["--compare", "--env", tiny_map(tmp_path), "--algos", "gcbc", "--epsilons", "1",
             "--seeds", "1", *TINY, "--out", str(tmp_path / "c")]
    experiments.main(flags)
    saved = next((tmp_path / "c").glob("*/metrics.json"))
    for damage in ("[]", "null", '{"flags": 3}', "{", ""):  # what a crash or an editor leaves
        saved.write_text(damage)
        capsys.readouterr()
        experiments.main(flags)
        assert "0 done before" in capsys.readouterr().out
        assert json.loads(saved.read_text())["algo"] == "gcbc"


def test_a_console_that_cannot_show_epsilon(tmp_path):
    """A non-UTF-8 console (Windows' cp1252, LC_ALL=C): files are UTF-8, the output replaces."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "LC_ALL": "C", "PYTHONUTF8": "0"}
    run = shell("experiments.py", ["--compare", "--env", tiny_map(tmp_path), "--algos", "gcbc",
                                   "--epsilons", "1", "--seeds", "1", *TINY, "--out", "c"],
                tmp_path, env=env)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0 and "Traceback" not in err and "\\u03b5" in out
    assert "| env | method | ε |" in (tmp_path / "c" / "compare.md").read_text(encoding="utf-8")


@pytest.mark.skipif(sys.platform == "win32", reason="no SIGINT to a child process on Windows")
def test_ctrl_c_in_a_sweep_says_how_to_resume(tmp_path):
    flags = ["--compare", "--env", tiny_map(tmp_path), "--algos", "metricrl,gcbc", "--epsilons",
             "1", "--seeds", "2", *TINY, "--steps", "300", "--eval-every", "300", "--out", "c"]
    run = shell("experiments.py", flags, tmp_path)  # runs of 300 steps: Ctrl-C comes mid-sweep
    run.stdout.readline(), run.stdout.readline()  # the header, then the first run's line
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and err.count("\n") == 1 and "resumes" in err
    resumed = shell("experiments.py", flags, tmp_path)
    assert resumed.wait(timeout=120) == 0 and " 0 done before" not in resumed.stdout.readline()

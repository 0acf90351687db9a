"""Tests for gridworld.py (the ground truth) and metricrl.py (the method). All on CPU, tiny maps."""
import os
import subprocess
import sys
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import gridworld
from gridworld import GridWorld, load_layout

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
    assert env.cell_index(2, 3) == 9 and env.index[1, 1] == -1


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


@pytest.mark.parametrize("spec, message", [
    ("no/such/map.txt", "file not found"),
    ("castle", "unknown layout 'castle'; known: open, rooms, maze"),
    ("maze8", "odd size"),
    ("....\n...\n....", "row 1 has 3 characters"),
    ("....\n.x..", "unknown character 'x' at row 1, column 1"),
    ("#.#\n###", "fewer than two free cells"),
])
def test_load_layout_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        load_layout(spec)

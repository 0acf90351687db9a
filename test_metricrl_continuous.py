"""Tests for metricrl_continuous.py: the method's pieces by hand, the data and its cache, the
truth it is measured against, tiny runs on PointMaze and FetchReach, the command line."""
import dataclasses
import errno
import functools
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import experiments
import metricrl
import metricrl_continuous as mc
from test_metricrl import WaitWatch

HERE = os.path.dirname(os.path.abspath(__file__))
UMAZE_FROM_FIRST_CELL = [0, 1, 2, 3, 6, 5, 4]  # counted by hand along the U, row-major cells


class Constant(nn.Module):
    """A network of the pair (s, g) that answers one learnable number: V, b."""
    def __init__(self, value):
        super().__init__()
        self.value = nn.Parameter(torch.tensor([float(value)]))

    def forward(self, s, g):
        return self.value.expand(len(s), 1)


def fake_data(m=64, seed=0, state=4, goal=2, action=2):
    """m random transitions in episodes of 8, with the columns train() reads."""
    gen = torch.Generator().manual_seed(seed)
    data = {"s": torch.randn(m, state, generator=gen), "a": torch.rand(m, action, generator=gen)}
    data["s2"] = data["s"] + 0.1 * torch.randn(m, state, generator=gen)
    data["end"] = torch.arange(m) // 8 * 8 + 7  # each row's episode's last row
    data["g2"] = data["s2"][:, :goal]
    return data


# ----------------------------------------------------------------- the method, by hand
def test_minibatch_critic_loss_by_hand():
    z = torch.tensor([[0.0, 0.0], [0.0, 3.0]])  # phi(s_i)
    z2 = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # phi(s'_i): moves of length 2 and 2
    args = mc.Args(lam=0.5)
    loss, info = mc.metric_loss(z, z2, args)
    positive = ((2 - 1) ** 2 + (2 - 1) ** 2) / 2
    # the other pairs: (0, 0) to (0, 1), and (0, 3) to (2, 0)
    negative = (-math.log(1 + 1e-6) - math.log(math.sqrt(13) + 1e-6)) / 2
    assert info["positive"].item() == pytest.approx(positive)
    assert info["negative"].item() == pytest.approx(negative, rel=1e-5)
    assert loss.item() == pytest.approx(positive + 0.5 * negative, rel=1e-5)


def test_weighted_gaussian_log_likelihood_by_hand():
    mean = torch.tensor([[0.0, 0.5], [0.2, -0.2]])
    a = torch.tensor([[1.0, 0.5], [0.2, -0.2]])
    w = torch.tensor([2.0, 0.5])
    log_norm = math.log(math.sqrt(2 * math.pi))  # SIGMA = 1
    log_pi = [-0.5 - 2 * log_norm, -2 * log_norm]  # a squared error of 1, then of 0
    expected = -(2.0 * log_pi[0] + 0.5 * log_pi[1]) / 2
    assert mc.SIGMA == 1.0
    assert mc.actor_loss(mean, a, w).item() == pytest.approx(expected, rel=1e-6)


def test_actor_weights_centred_one_step_and_gcbc():
    """With phi the identity, d(s, g) = ||s - g||: A = 2 - 1 = 1 for each row; b = 0.25."""
    s = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    s2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.zeros(2, 2)
    args = mc.Args(beta=2.0, w_max=5.0)
    w, fit = mc.actor_weights(nn.Identity(), Constant(0.25), s, s2, g, args)
    assert torch.allclose(w, torch.full((2,), math.exp(2.0 * 0.75)))  # exp(beta (A - b)) = 4.48
    assert fit.item() == pytest.approx(0.75 ** 2)
    fit.backward()  # b learns from its squared error; the weights carry no gradient
    assert not w.requires_grad
    w, fit = mc.actor_weights(nn.Identity(), None, s, s2, g, dataclasses.replace(args, w_max=5))
    assert torch.allclose(w, torch.full((2,), 5.0)) and fit == 0.0  # exp(2) = 7.4, clipped
    w, _ = mc.actor_weights(None, None, s, s2, g, args)
    assert torch.equal(w, torch.ones(2))


def test_goal_is_a_state_at_rest_and_distance_reads_phi():
    g = torch.tensor([[1.0, 2.0]])
    assert torch.equal(mc.goal_state(g, 4), torch.tensor([[1.0, 2.0, 0.0, 0.0]]))
    s = torch.tensor([[4.0, 6.0, 5.0, 5.0]])
    assert mc.distance(nn.Identity(), s, g, mc.Args()).item() == pytest.approx(
        math.sqrt(9 + 16 + 25 + 25))


def test_td_loss_target_by_hand():
    """Every row the same transition, its s' far from g: y = gamma V_target(s', g), after
    V_target moved TARGET_RATE of the way to V; u = y - V < 0 weighs 1 - expectile."""
    data = {"s": torch.zeros(8, 4), "s2": torch.ones(8, 4), "a": torch.zeros(8, 2),
            "end": torch.full((8,), 7), "g2": torch.full((8, 2), 5.0)}
    task = mc.Task("x", {}, 10, 0.45, "success", 2)
    args = mc.Args(gamma=0.9, expectile=0.7, batch=8)
    v, target = Constant(2.0), Constant(1.0)
    loss, _ = mc.td_loss(v, target, data, task, args)
    moved = 1.0 + mc.TARGET_RATE * (2.0 - 1.0)
    u = 0.9 * moved - 2.0
    assert target.value.item() == pytest.approx(moved)
    assert loss.item() == pytest.approx(0.3 * u ** 2, rel=1e-5)
    data["g2"] = data["s2"][:, :2].clone()  # s' reaches g: y = gamma
    loss, _ = mc.td_loss(v, target, data, task, args)
    assert loss.item() == pytest.approx(0.3 * (0.9 - 2.0) ** 2, rel=1e-5)


class Recording(Constant):
    """Constant, keeping the last states and goals it was asked about."""
    def forward(self, s, g):
        self.asked = s, g
        return super().forward(s, g)


def test_td_goals_are_half_hindsight_for_the_same_transitions():
    data = fake_data(m=400)
    v = Recording(0.5)
    mc.td_loss(v, Constant(0.5), data, mc.Task("x", {}, 10, 0.45, "success", 2),
               mc.Args(batch=400))
    s, g = v.asked
    rows = [int(torch.nonzero((data["s"] == row).all(1))[0]) for row in s]
    goal_rows = [int(torch.nonzero((data["g2"] == goal).all(1))[0]) for goal in g]
    later = np.mean([i <= j <= i // 8 * 8 + 7 for i, j in zip(rows, goal_rows)])
    assert 0.4 < later < 0.7  # half hindsight, and a random state in its episode 1 time in 50


def test_hindsight_goals_are_later_states_of_the_same_episode():
    data = fake_data(m=400)
    torch.manual_seed(0)
    s, a, s2, g = mc.sample(data, 2000, "hindsight")
    rows = [int(torch.nonzero((data["s"] == row).all(1))[0]) for row in s[:200]]
    goal_rows = [int(torch.nonzero((data["g2"] == goal).all(1))[0]) for goal in g[:200]]
    assert all(i <= j <= i // 8 * 8 + 7 for i, j in zip(rows, goal_rows))
    assert any(i < j for i, j in zip(rows, goal_rows))  # not only the transition's own s'
    _, _, _, g = mc.sample(data, 2000, "random")
    assert len(torch.unique(g, dim=0)) > 300  # any data state


# ------------------------------------------------------------------ the truth and data
@pytest.fixture
def few_copies(monkeypatch):
    """8 environment copies in lockstep instead of 32: a tiny run spends less making them."""
    monkeypatch.setattr(mc, "COPIES", 8)


@pytest.fixture(scope="module")
def umaze():
    task, _ = mc.setup(mc.Args(env="umaze"))
    return task


def test_umaze_bfs_truth_counted_by_hand(umaze):
    assert umaze.maze.cells.tolist() == [[1, 1], [1, 2], [1, 3], [2, 3], [3, 1], [3, 2], [3, 3]]
    d = umaze.maze.distance_matrix()
    assert d[0].tolist() == UMAZE_FROM_FIRST_CELL
    assert (d == d.T).all() and d.max() == 6
    assert umaze.limit == 300 and umaze.kwargs["continuing_task"] is False


def test_test_episodes_cover_every_pair_and_start_in_their_cells(umaze):
    data = {"s": torch.zeros(4, 4), "g2": torch.zeros(4, 2)}
    truth = mc.ground_truth(umaze, data, [], mc.Args(env="umaze"))
    pairs = {(tuple(t["options"]["reset_cell"]), tuple(t["options"]["goal_cell"]))
             for t in truth["starts"]}
    assert len(truth["starts"]) == 1000 and len(pairs) == 7 * 6  # every ordered pair, s != g
    assert len({t["seed"] for t in truth["starts"]}) == 1000  # each its own noise
    assert len(truth["quick"]) == 100 and truth["d"].shape == (7, 7)
    env = umaze.make()
    centre = {tuple(cell): xy for cell, xy in zip(umaze.maze.cells.tolist(), truth["g"].tolist())}
    for start in truth["starts"][:20]:  # the environment's own reset puts both in their cells
        obs, _ = env.reset(**start)
        start_centre = centre[tuple(start["options"]["reset_cell"])]
        goal_centre = centre[tuple(start["options"]["goal_cell"])]
        assert np.abs(obs["achieved_goal"] - start_centre).max() <= 0.25
        assert np.abs(obs["desired_goal"] - goal_centre).max() <= 0.25
    truth = mc.ground_truth(umaze, data, [], mc.Args(env="umaze", tests=10))
    assert len(truth["starts"]) == 10


def test_a_gridworld_map_becomes_its_pointmaze(tmp_path):
    task, _ = mc.setup(mc.Args(env="#####\n#...#\n#.#.#\n#...#\n#####"))
    env = task.make()
    maze = env.unwrapped.maze
    assert maze.maze_map == [[1] * 7, [1] * 7, [1, 1, 0, 0, 0, 1, 1], [1, 1, 0, 1, 0, 1, 1],
                             [1, 1, 0, 0, 0, 1, 1], [1] * 7, [1] * 7]  # a wall around the map
    data = {"s": torch.zeros(4, 4), "g2": torch.zeros(4, 2)}
    truth = mc.ground_truth(task, data, [], mc.Args(tests=5))
    for cell, xy in zip(task.maze.cells, truth["g"].tolist()):
        assert np.allclose(maze.cell_rowcol_to_xy(cell), xy)
    assert task.limit == 300 and task.maze.distance_matrix().max() == 4


def test_behaviours(umaze):
    rng = np.random.default_rng(0)
    obs, goal, previous = np.zeros((5000, 4)), np.zeros((5000, 2)), np.zeros((5000, 2))
    uniform = mc.behaviour(mc.Args(), umaze, rng, obs, goal, previous)
    assert uniform.min() >= -1 and uniform.max() <= 1 and abs(uniform.std() - 1 / 3**0.5) < 0.02
    ou = mc.behaviour(mc.Args(data="ou"), umaze, rng, obs, goal, np.full((5000, 2), 0.5))
    assert abs(ou.mean() - 0.45) < 0.01 and ou.std() < 0.2  # (1 - theta) a + sigma U(-1, 1)
    reach = mc.Task("FetchReach-v4", {}, 50, 0.05, "is_success", 3)
    obs, goal = np.zeros((2, 10)), np.array([[0.02, 0.0, 0.0], [0.0, -0.2, 0.1]])
    scripted = mc.behaviour(mc.Args(epsilon=0.0), reach, rng, obs, goal, np.zeros((2, 4)))
    assert np.allclose(scripted, [[0.4, 0, 0, 0], [0, -1, 0.5, 0]])  # straight, 5 cm at most


def test_data_is_cached_reused_and_invalidated_by_a_knob(umaze, tmp_path, monkeypatch, few_copies):
    collected = []
    collect = mc.collect_dataset

    def counting(task, args, rng):
        collected.append(args.data)
        return collect(task, args, rng)

    monkeypatch.setattr(mc, "collect_dataset", counting)
    args = mc.Args(episodes=3, quiet=True)
    data, reached = mc.cached_dataset(umaze, args, str(tmp_path))
    again, reached_again = mc.cached_dataset(umaze, args, str(tmp_path))
    assert collected == ["random"] and reached == reached_again
    assert all(np.array_equal(data[key], again[key]) for key in data)
    assert data["s"].dtype == np.float32 and (data["s"][1:] == data["s2"][:-1]).any()
    ends = data["end"]
    assert ends[-1] == len(ends) - 1 and (np.diff(ends) >= 0).all()
    mc.cached_dataset(umaze, dataclasses.replace(args, data="ou"), str(tmp_path))
    mc.cached_dataset(umaze, dataclasses.replace(args, seed=1), str(tmp_path))
    assert collected == ["random", "ou", "random"]
    assert len(os.listdir(tmp_path)) == 3  # one file per data, nothing half-written


def test_a_full_disk_is_refused_and_leaves_nothing(umaze, tmp_path, monkeypatch, few_copies):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mc.np, "savez", full)
    with pytest.raises(metricrl.UsageError, match="No space left"):
        mc.cached_dataset(umaze, mc.Args(episodes=2, quiet=True), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_fetch_controller_reaches_every_goal_straight():
    task, _ = mc.setup(mc.Args(env="reach"))
    envs = [task.make() for _ in range(4)]
    rng = np.random.default_rng(0)
    controller = functools.partial(mc.behaviour, mc.Args(epsilon=0.0), task, rng)
    episodes = mc.run_episodes(task, envs, [{"seed": k} for k in range(8)], controller, True)
    assert all(success for _, _, success, _ in episodes)
    assert all(steps <= 10 for *_, steps in episodes)  # within 15 cm at 5 cm a step, and a lag


def test_fetch_data_episodes_end_at_their_goal(few_copies):
    """After the goal the scripted arm stands still (s' = s): the data stops there, as PointMaze's."""
    task, _ = mc.setup(mc.Args(env="reach"))
    args = mc.Args(env="reach", epsilon=0.0, episodes=8, quiet=True)
    data, reached = mc.collect_dataset(task, args, np.random.default_rng(0))
    assert reached == 1.0 and len(data["s"]) <= 8 * 10  # not 8 x 50 steps
    moved = np.linalg.norm(data["s2"][:, :3] - data["s"][:, :3], axis=1)
    assert moved.min() > 0.005  # every transition a move, none standing at the goal


# ------------------------------------------------------------------------ training
class StartAfterEachStep:
    """train()'s log for a watch: start() as each step ends."""
    def __init__(self, start):
        self.start, self.history = start, []

    def add(self, step, info):
        self.start()


def watched_train(algo, advantage, device, start, stop):
    """train() on fake data: start() after each step's end (the first, where Adam makes its
    state, unwatched), stop() at the end."""
    args = mc.Args(algo=algo, advantage=advantage, steps=12, batch=16, hidden=8, latent=4,
                   critic_only=0.3, quiet=True, eval_every=100)
    data = {key: column.to(device) for key, column in fake_data().items()}
    nets = [None if net is None else net.to(device) for net in mc.build(data, args)]
    mc.train(data, nets, mc.Task("x", {}, 10, 0.45, "success", 2), args, StartAfterEachStep(start))
    stop()
    return nets


WATCHED = [("metricrl", "centred"), ("metricrl", "one-step"), ("td", "centred"),
           ("gcbc", "centred")]


@pytest.mark.parametrize("algo, advantage", WATCHED)
def test_training_steps_never_wait_for_the_device(algo, advantage):
    watch = WaitWatch()
    with watch:
        nets = watched_train(algo, advantage, "cpu", watch.start, watch.stop)
    assert watch.found == [] and nets[1] is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("algo, advantage", WATCHED)
def test_cuda_training_steps_never_synchronize(algo, advantage):
    def start():
        torch.cuda.set_sync_debug_mode("error")

    def stop():
        torch.cuda.set_sync_debug_mode("default")

    try:
        watched_train(algo, advantage, "cuda", start, stop)
    finally:
        stop()


# ------------------------------------------------------------------------- runs
def test_a_tiny_run_on_umaze_beats_a_random_policy(umaze, tmp_path, few_copies):
    args = ["--env", "umaze", "--episodes", "30", "--steps", "600", "--batch", "256", "--tests",
            "100", "--eval-every", "600", "--quiet", "--out", str(tmp_path / "run")]
    metrics = mc.main(args)
    data = {"s": torch.zeros(4, 4), "g2": torch.zeros(4, 2)}
    starts = mc.ground_truth(umaze, data, [], mc.Args(tests=100))["starts"]
    envs = [umaze.make() for _ in range(mc.COPIES)]
    policy = functools.partial(mc.behaviour, mc.Args(), umaze, np.random.default_rng(0))
    random_success = np.mean([success for _, _, success, _ in mc.run_episodes(
        umaze, envs, starts, policy, True)])
    assert metrics["success_rate"] >= random_success + 0.2, (metrics, random_success)
    assert metrics["spearman"] > 0.5 and metrics["tests"] == 100
    assert sorted(os.listdir(tmp_path / "run")) == sorted(mc.OUTPUTS)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["success_rate"] == metrics["success_rate"] and saved["flags"]["steps"] == 600
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert {"critic", "actor", "b", "history", "args", "maze_map"} <= set(ckpt)
    assert len(os.listdir(tmp_path / "datasets")) == 1  # the data, beside the run folder


@pytest.mark.parametrize("algo", ["gcbc", "td"])
def test_baselines_run_on_fetchreach(algo, tmp_path, few_copies):
    args = ["--env", "reach", "--algo", algo, "--episodes", "16", "--steps", "60", "--tests",
            "16", "--batch", "64", "--epsilon", "0.5", "--quiet", "--out", str(tmp_path / algo)]
    metrics = mc.main(args)
    assert 0 <= metrics["success_rate"] <= 1 and metrics["tests"] == 16
    assert metrics["path_ratio"] >= 1 or math.isnan(metrics["path_ratio"])
    assert math.isnan(metrics["spearman"]) == (algo == "gcbc")  # gcbc has no critic
    rows = (tmp_path / algo / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) >= 2


def test_metricrl_learns_fetchreach_from_random_data(tmp_path, few_copies):
    args = ["--env", "reach", "--episodes", "40", "--steps", "300", "--batch", "256", "--tests",
            "50", "--eval-every", "300", "--quiet", "--out", str(tmp_path / "run")]
    metrics = mc.main(args)
    assert metrics["success_rate"] >= 0.5 and metrics["spearman"] > 0.5
    assert metrics["path_ratio"] >= 1  # the straight line is the shortest way


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_tiny_run_on_cuda(tmp_path):
    args = ["--env", "umaze", "--episodes", "10", "--steps", "50", "--tests", "20",
            "--device", "cuda", "--quiet", "--out", str(tmp_path / "run")]
    assert mc.main(args)["device"] == "cuda"


# --------------------------------------------------------------------- command line
@pytest.mark.parametrize("flags, message", [
    (["--env", "nosuchmaze"], "unknown layout 'nosuchmaze'"),
    (["--env", "oneway"], "without one-way cells"),
    (["--env", "hypermaze3s5"], "a connected 2-D map"),
    (["--env", "..#..\n..#.."], "a connected 2-D map"),  # two rooms, no door
    (["--env", "maze25"], "--env must be 200 cells or fewer"),
    (["--batch", "1"], "--batch must be 2 or more"),
    (["--gamma", "1"], "--gamma must be in (0, 1)"),
    (["--epsilon", "1.5"], "--epsilon must be in [0, 1]"),
    (["--fourier", "-1"], "--fourier must be 0 or more"),
    (["--lr", "nan"], "--lr must be"),
    (["--device", "tpu"], "--device tpu"),
    (["--algo", "sac"], "invalid choice"),
])
def test_bad_input_is_refused_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        mc.main([*flags, "--out", "/nonexistent/never"])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and message in error and error.count("\n") == 1, error


def test_fetchreach_on_a_mujoco_that_breaks_it_is_refused(monkeypatch, capsys):
    make = mc.gymnasium.make

    def broken(env_id, **kwargs):  # as gymnasium-robotics' Fetch does on mujoco >= 3.12
        if env_id.startswith("FetchReach"):
            raise AssertionError
        return make(env_id, **kwargs)

    monkeypatch.setattr(mc.gymnasium, "make", broken)
    with pytest.raises(SystemExit) as stop:
        mc.main(["--env", "reach"])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "does not run here (AssertionError" in error
    assert "pip install -r requirements.txt" in error


def test_help_lists_every_knob_and_metricrl_py_never_imports_this_file():
    result = subprocess.run([sys.executable, "metricrl_continuous.py", "--help"], cwd=HERE,
                            capture_output=True, text=True, check=True)
    for field in dataclasses.fields(mc.Args):
        assert "--" + field.name.replace("_", "-") in result.stdout
    assert "Adroit" not in result.stderr  # gymnasium-robotics' notice, kept out
    with open(os.path.join(HERE, "metricrl.py"), encoding="utf-8") as f:
        assert not re.search(r"^\s*(import|from)\s+metricrl_continuous", f.read(), re.M)


def test_the_continuous_sweep_runs_its_rows_with_this_file_and_resumes(tmp_path, monkeypatch):
    """experiments.py --continuous: each row a run of this file with its own knobs (the
    sweep's flags given pass on, the rest its defaults), the table, and a second call that
    finds every run done (run() replaced: a run's own work is tested above)."""
    runs = []

    def fake_run(cell):
        runs.append(cell)
        metrics = {"success_rate": 0.5, "path_ratio": math.nan, "spearman": 0.9,
                   "monotonicity": 0.8, "seconds": 1.0, "device": "cpu",
                   "flags": dataclasses.asdict(cell)}
        os.makedirs(cell.out)
        with open(os.path.join(cell.out, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f)
        return metrics

    monkeypatch.setattr(mc, "run", fake_run)
    flags = ["--continuous", "--seeds", "1", "--steps", "7", "--quiet", "--out", str(tmp_path)]
    experiments.main(flags)
    assert len(runs) == 25 and all(type(cell) is mc.Args for cell in runs)
    assert {cell.steps for cell in runs} == {7} and {cell.hidden for cell in runs} == {256}
    kinds = {(cell.env, cell.algo, cell.advantage, cell.data, cell.epsilon) for cell in runs}
    assert ("large", "td", "centred", "random", 1.0) in kinds
    assert ("medium", "metricrl", "one-step", "random", 1.0) in kinds
    assert ("reach", "gcbc", "centred", "random", 0.25) in kinds
    table = (tmp_path / "continuous.md").read_text(encoding="utf-8")
    assert "| umaze | metricrl | random | 0.500 | — | 0.900 | 0.800 | 1 |" in table
    runs.clear()
    experiments.main(flags)  # every run found done
    assert runs == []

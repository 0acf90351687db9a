"""A tabular, goal-conditioned gridworld with exact shortest-path ground truth.

## Description
An agent moves between the free cells of an ASCII map and must reach a goal cell.
Every state is a cell, so the whole MDP fits in a table and the exact distance
between any two cells (the fewest actions) is known by breadth-first search.
That ground truth is what metricrl.py measures a learned critic and policy against.

    >>> import gridworld, gymnasium
    >>> env = gymnasium.make("GridWorld-v0", layout="rooms", render_mode="ansi")
    >>> obs, info = env.reset(seed=0)
    >>> print(env.render())

## Action Space
`Discrete(4)`: 0 up, 1 right, 2 down, 3 left (absolute moves). A move into a wall
or off the map leaves the agent where it is. A one-way cell (`^ > v <` on the map) can
be entered from any side but left only in its arrow's direction; any other move stays.
Then actions are not invertible and distances are not symmetric: `distance_matrix()`
is from row to column. With `slip=p`, a move goes in one of the three other directions
(uniformly) with probability p; the ground truth stays the deterministic BFS.

## Observation Space
A `Dict` in the Gymnasium-Robotics goal-conditioned convention, each entry the
(row, col) of a cell as an int64 array of shape (2,):
`observation` (the agent), `achieved_goal` (the agent again), `desired_goal` (the goal).

## Rewards
1.0 on the step that reaches the goal, else 0.0 (sparse).

## Episode End
Terminated when the agent reaches the goal. Truncated after `max_episode_steps`
(1000 when made through `gymnasium.make`), more than every shortest path on every
named map including `maze51` (diameter 224).

## Arguments
`layout`: a name from `LAYOUTS`, `maze<N>` for a generated N x N maze (odd N >= 7),
a path to a text file of ASCII rows, or the rows themselves as one string.
`render_mode`: None, "ansi" or "rgb_array".
`slip`: probability that a move slips to another direction (default 0: deterministic).
"""
import functools
import os
import re

import gymnasium
import numpy as np

# Action a moves by MOVES[a] = (d_row, d_col): 0 up, 1 right, 2 down, 3 left.
MOVES = np.array([(-1, 0), (0, 1), (1, 0), (0, -1)])

# Map characters: walls, free cells, and one-way free cells left only by their action.
WALL, FREE = "#", "."
ONE_WAY = {"^": 0, ">": 1, "v": 2, "<": 3}
CELL_CHARS = {WALL: "wall", FREE: "free cell",
              **{ch: f"one-way cell (left only by action {a})" for ch, a in ONE_WAY.items()}}

LAYOUTS = {
    # An empty room: 8 x 8 free cells, diameter 14.
    "open": """
##########
#........#
#........#
#........#
#........#
#........#
#........#
#........#
#........#
##########""",
    # Sutton's four rooms: 104 free cells, four doorways, diameter 20.
    "rooms": """
#############
#.....#.....#
#.....#.....#
#...........#
#.....#.....#
#.....#.....#
##.####.....#
#.....###.###
#.....#.....#
#.....#.....#
#...........#
#.....#.....#
#############""",
    # The default: 99 free cells, long corridors, dead ends, two loops, diameter 56.
    "maze": """
###############
#.....#.....#.#
#####.#.###.#.#
#.....#.#.#.#.#
#.#####.#.#.#.#
#.......#...#.#
###.#.#.#.###.#
#...#.#.#...#.#
#.###.#.###.#.#
#.#...#.#...#.#
#.#####.#.###.#
#.#.....#.....#
#.#.#####.###.#
#...#.........#
###############""",
    # Corridors with many loops, 13 x 21: 126 free cells, seven loops, diameter 34.
    "loops": """
#####################
#.......#.....#.....#
#.#####.#.###.#.###.#
#.#...#...#.......#.#
#.#.#.#####.#####.#.#
#...#.......#...#...#
###.#.#####.#.#.###.#
#...#.#.......#.....#
#.###.#.#####.#####.#
#.....#.#...#.......#
#.#####.#.#.#####.#.#
#.........#.......#.#
#####################""",
    # Four rooms with two one-way doors (> and <), a circulation: east at the top, west
    # at the bottom. From the top-right room back to the top-left one is 3 rooms around.
    "oneway": """
#############
#.....#.....#
#.....#.....#
#.....>.....#
#.....#.....#
#.....#.....#
##.####.....#
#.....###.###
#.....#.....#
#.....#.....#
#.....<.....#
#.....#.....#
#############""",
}


# ----------------------------------------------------------------------------- maps
def generate_maze(n):
    """An n x n maze (outer wall included, n odd >= 7), the same text on every machine.

    A depth-first "recursive backtracker" carves a perfect maze (one path between any
    two cells) on the ((n-1)/2)^2 odd cells; then one inner wall in 25 is knocked out
    so that there are loops. Its own LCG, seeded by n: no global RNG, no hashing.
    """
    m, state = (n - 1) // 2, n

    def below(k):  # a 64-bit linear congruential generator (Knuth's MMIX constants)
        nonlocal state
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        return (state >> 33) % k

    grid = [[WALL] * n for _ in range(n)]
    grid[1][1] = FREE
    stack, seen = [(0, 0)], {(0, 0)}
    while stack:
        r, c = stack[-1]
        options = [(r + dr, c + dc) for dr, dc in MOVES.tolist()
                   if 0 <= r + dr < m and 0 <= c + dc < m and (r + dr, c + dc) not in seen]
        if not options:
            stack.pop()
            continue
        nr, nc = options[below(len(options))]
        grid[2 * nr + 1][2 * nc + 1] = grid[r + nr + 1][c + nc + 1] = FREE
        seen.add((nr, nc))
        stack.append((nr, nc))
    inner_walls = [(r, c) for r in range(1, n - 1) for c in range(1, n - 1)
                   if grid[r][c] == WALL and r % 2 != c % 2]
    for _ in range(max(1, m * m // 25)):
        r, c = inner_walls.pop(below(len(inner_walls)))
        grid[r][c] = FREE
    return "\n".join("".join(row) for row in grid)


def parse_layout(text):
    """ASCII rows -> (H, W) array of map characters, checked; raises ValueError."""
    rows = [row.rstrip() for row in text.strip("\n").split("\n")]
    if not any(rows):
        raise ValueError("layout is empty")
    for i, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise ValueError(f"layout rows differ in length: row {i} has {len(row)} "
                             f"characters, row 0 has {len(rows[0])}")
        for j, ch in enumerate(row):
            if ch not in CELL_CHARS:
                known = ", ".join(f"'{k}' {v}" for k, v in CELL_CHARS.items())
                raise ValueError(f"unknown character {ch!r} at row {i}, column {j} "
                                 f"(0-based); known: {known}")
    grid = np.array([list(row) for row in rows])
    if (grid != WALL).sum() < 2:
        raise ValueError("layout has fewer than two free cells")
    return grid


def load_layout(spec):
    """A layout name, `maze<N>`, a file path, or map text -> the checked map text.

    Cells outside the map count as walls, so a border of '#' is optional.
    """
    spec = os.fspath(spec)  # a str, or a pathlib.Path
    if "\n" in spec:
        text = spec
    elif spec in LAYOUTS:
        text = LAYOUTS[spec]
    elif re.fullmatch(r"maze\d+", spec):
        n = int(spec[4:])
        if n < 7 or n % 2 == 0:
            raise ValueError(f"{spec}: a generated maze needs an odd size N >= 7, e.g. maze25")
        text = generate_maze(n)
    elif os.path.sep in spec or "." in spec or os.path.exists(spec):
        if not os.path.isfile(spec):
            raise ValueError(f"layout file not found: {spec}")
        with open(spec) as f:
            text = f.read()
    else:
        raise ValueError(f"unknown layout {spec!r}; known: {', '.join(LAYOUTS)}, "
                         "maze<N> (odd N >= 7), or a path to a map file")
    grid = parse_layout(text)
    return "\n".join("".join(row) for row in grid)


# --------------------------------------------------------------------- ground truth
# Each table is computed once per map text and cached; the arrays are read-only.
def _frozen(array):
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=16)
def _transitions(text):
    """-> cells (N, 2), index grid (H, W) with -1 on walls, next cell (N, 4)."""
    grid = parse_layout(text)
    free = grid != WALL
    cells = np.argwhere(free)  # (N, 2), row-major order
    index = np.full(grid.shape, -1)
    index[free] = np.arange(len(cells))
    target = cells[:, None, :] + MOVES[None, :, :]  # (N, 4, 2)
    inside = ((target >= 0) & (target < grid.shape)).all(-1)  # (N, 4)
    target = np.where(inside[..., None], target, cells[:, None, :])  # off-map: stay
    nxt = index[target[..., 0], target[..., 1]]  # (N, 4), -1 where a wall
    nxt = np.where(nxt >= 0, nxt, np.arange(len(cells))[:, None])  # wall: stay
    for ch, a in ONE_WAY.items():  # one-way cells: every other action stays
        i = index[grid == ch]  # (K,)
        nxt[i[:, None], np.flatnonzero(np.arange(4) != a)[None]] = i[:, None]
    return _frozen(cells), _frozen(index), _frozen(nxt)


@functools.lru_cache(maxsize=16)
def _distances(text):
    """All-pairs BFS, all sources at once: d[i, j] = fewest actions from i to j, or -1.

    reached[j, i] says whether target j has been reached from source i. One BFS level
    is one gather per action: j joins the frontier of source i if a predecessor
    k with nxt[k, a] = j was in it. Rows are gathered whole (no per-pair Python work).
    """
    _, _, nxt = _transitions(text)
    n = len(nxt)
    # pred[j, a]: the cell that action a moves into j (n, a padding row, if none).
    pred = np.full((n + 1, 4), n)
    k, a = np.nonzero(nxt != np.arange(n)[:, None])
    pred[nxt[k, a], a] = k
    dist = np.full((n, n), -1, dtype=np.int32)  # (target, source) while building
    frontier = np.zeros((n + 1, n), dtype=bool)  # (target + padding row, source)
    frontier[np.arange(n), np.arange(n)] = True
    reached = frontier[:n].copy()
    level = 0
    while frontier.any():
        dist[frontier[:n]] = level
        step = np.zeros((n + 1, n), dtype=bool)
        for a in range(4):
            step[:n] |= frontier[pred[:n, a]]  # (n, n) row gather
        frontier = step
        frontier[:n] &= ~reached
        reached |= frontier[:n]
        level += 1
    return _frozen(np.ascontiguousarray(dist.T))  # (source, target)


@functools.lru_cache(maxsize=4)
def _optimal_actions(text):
    """opt[i, j, a] = action a from i lies on a shortest path to j."""
    _, _, nxt = _transitions(text)
    d = _distances(text)
    after = np.moveaxis(d[nxt], 1, 2)  # (N, N, 4): d(next(i, a), j)
    return _frozen((after == d[:, :, None] - 1) & (d[:, :, None] > 0))


# ---------------------------------------------------------------------- environment
class GridWorld(gymnasium.Env):
    """A goal-conditioned gridworld; see the module docstring for the spec.

    Ground truth for batched use (N free cells, row-major):
        cells               (N, 2) int   (row, col) of each free cell
        index               (H, W) int   cell index of (row, col), -1 on walls
        transitions()       (N, 4) int   next cell index for each cell and action
        distance_matrix()   (N, N) int32 fewest actions from i to j, -1 if unreachable
        optimal_actions()   (N, N, 4) bool  actions from i on a shortest path to j
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, layout="maze", render_mode=None, slip=0.0):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}")
        if not 0 <= slip <= 1:
            raise ValueError(f"slip must be in [0, 1], got {slip}")
        self.slip = slip
        self.layout = load_layout(layout)
        self.render_mode = render_mode
        self.grid = parse_layout(self.layout)  # (H, W) map characters
        self.height, self.width = self.grid.shape
        self.cells, self.index, _ = _transitions(self.layout)
        cell = gymnasium.spaces.MultiDiscrete([self.height, self.width])
        self.observation_space = gymnasium.spaces.Dict(
            {"observation": cell, "achieved_goal": cell, "desired_goal": cell})
        self.action_space = gymnasium.spaces.Discrete(4)
        self.agent = self.goal = 0  # cell indices

    # Ground truth, cached per map.
    def transitions(self):
        return _transitions(self.layout)[2]

    def distance_matrix(self):
        return _distances(self.layout)

    def optimal_actions(self):
        return _optimal_actions(self.layout)

    def cell_index(self, row, col):
        """(row, col) -> index into `cells`; ValueError for a wall or off the map."""
        if not (0 <= row < self.height and 0 <= col < self.width) or self.index[row, col] < 0:
            raise ValueError(f"({row}, {col}) is not a free cell of this map")
        return int(self.index[row, col])

    # Gymnasium API.
    def _obs(self):
        agent, goal = self.cells[self.agent].copy(), self.cells[self.goal].copy()
        return {"observation": agent, "achieved_goal": agent.copy(), "desired_goal": goal}

    def _info(self):
        return {"distance": int(self.distance_matrix()[self.agent, self.goal])}

    def reset(self, *, seed=None, options=None):
        """Start and goal uniform over ordered pairs of distinct connected free cells.

        options={"start": (r, c), "goal": (r, c)} fixes either or both.
        """
        super().reset(seed=seed)
        options = options or {}
        d = self.distance_matrix()
        fixed = {k: self.cell_index(*options[k]) for k in ("start", "goal") if k in options}
        start, goal = fixed.get("start"), fixed.get("goal")
        if start is not None and goal is not None and d[start, goal] <= 0:
            raise ValueError(f"goal {tuple(options['goal'])} is not reachable from "
                             f"start {tuple(options['start'])} (or is the start)")
        ok = d > 0
        if not ok[start if start is not None else slice(None),
                  goal if goal is not None else slice(None)].any():
            raise ValueError("no start and goal pair with a path between them")
        while True:  # rejection sampling: uniform over the allowed pairs
            s = start if start is not None else int(self.np_random.integers(len(d)))
            g = goal if goal is not None else int(self.np_random.integers(len(d)))
            if ok[s, g]:
                break
        self.agent, self.goal = s, g
        return self._obs(), self._info()

    def step(self, action):
        action = int(action)
        if self.slip and self.np_random.random() < self.slip:  # one of the other three
            action = (action + 1 + int(self.np_random.integers(3))) % 4
        self.agent = int(self.transitions()[self.agent, action])
        reached = self.agent == self.goal
        return self._obs(), float(reached), reached, False, self._info()

    def compute_reward(self, achieved_goal, desired_goal, info):
        """Gymnasium-Robotics convention: reward for (batches of) achieved/desired goals."""
        return np.all(np.asarray(achieved_goal) == np.asarray(desired_goal), axis=-1).astype(float)

    def render(self):
        if self.render_mode == "ansi":
            grid = self.grid.copy()
            (gr, gc), (ar, ac) = self.cells[self.goal], self.cells[self.agent]
            grid[gr, gc], grid[ar, ac] = "G", "A"
            return "\n".join("".join(row) for row in grid)
        if self.render_mode == "rgb_array":
            colors = np.where((self.grid == WALL)[..., None], [40, 40, 40], [235, 235, 235])
            colors[np.isin(self.grid, list(ONE_WAY))] = [235, 200, 120]  # one-way cells
            colors[tuple(self.cells[self.goal])] = [40, 170, 60]
            colors[tuple(self.cells[self.agent])] = [30, 90, 220]
            return np.kron(colors, np.ones((8, 8, 1))).astype(np.uint8)  # 8 px a cell
        return None


if "GridWorld-v0" not in gymnasium.registry:
    gymnasium.register(id="GridWorld-v0", entry_point=GridWorld, max_episode_steps=1000)

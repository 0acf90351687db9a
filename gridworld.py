"""A tabular, goal-conditioned gridworld with exact shortest-path ground truth.

## Description
An agent moves between the free cells of an ASCII map to a goal cell. The whole MDP fits
in a table, and breadth-first search gives the exact distance (fewest actions) between any
two cells: the truth metricrl.py measures against. `gymnasium.make("GridWorld-v0")`.

## Action Space
`Discrete(4)`: 0 up, 1 right, 2 down, 3 left; into a wall or off the map, the agent stays.
A one-way cell (`^ > v <`) is entered from any side and left only in its arrow's direction:
actions are then not invertible, and `distance_matrix()` is from row to column.

## Observation Space
A `Dict` (Gymnasium-Robotics' goal-conditioned convention) of (row, col) int64 arrays,
shape (2,): `observation` and `achieved_goal` (the agent), `desired_goal` (the goal); as
RGB images through the wrapper `ImageObservation(env, tile)`.

## Starting State
Start and goal are drawn uniformly over the ordered pairs of distinct cells with a path
between them; `reset(options={"start": (r, c), "goal": (r, c)})` fixes either or both.

## Rewards
1.0 on the step that reaches the goal, else 0.0.

## Episode End
At the goal; truncated after 1000 steps through `gymnasium.make` (`maze51`'s diameter: 224).

## Arguments
`layout`: a name from `LAYOUTS`, `maze<N>` (a generated N x N maze, odd 7 <= N <= 1001), a
text file of ASCII rows, or the rows as one string. `render_mode`: None, "ansi" or
"rgb_array". `slip`: the probability that a move goes in one of the other three directions.
"""
import functools
import numbers
import os
import re

import gymnasium
import numpy as np

MOVES = np.array([(-1, 0), (0, 1), (1, 0), (0, -1)])  # (d_row, d_col): up, right, down, left
WALL, FREE = "#", "."  # map characters
AGENT = (30, 90, 220)  # the agent's colour in images
ONE_WAY = {"^": 0, ">": 1, "v": 2, "<": 3}  # one-way cells, left only by this action
ONE_WAY_NAMES = {char: f"one-way cell (left only by action {a})" for char, a in ONE_WAY.items()}
CELL_CHARS = {WALL: "wall", FREE: "free cell", **ONE_WAY_NAMES}  # for error messages

LAYOUTS = {  # the named maps, as ASCII rows
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
    # The four rooms with one-way doors, > at the top and < at the bottom: a
    # circulation.
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
class Lcg:
    """A 64-bit linear congruential generator (Knuth's MMIX constants): the same numbers on
    every machine and Python, and no global RNG touched."""

    def __init__(self, seed):
        self.state = seed

    def below(self, k):
        """A number in [0, k)."""
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) % 2**64
        return (self.state >> 33) % k


def generate_maze(n):
    """An n x n maze (outer wall included, n odd >= 7), the same on every machine: a
    depth-first backtracker carves a perfect maze through m x m rooms on the odd cells, then
    one wall in 25 between two rooms is knocked out, for loops. Seeded by n."""
    m = (n - 1) // 2  # rooms a side: room (r, c) is cell (2r + 1, 2c + 1)
    lcg = Lcg(n)
    grid = [[WALL] * n for _ in range(n)]
    grid[1][1] = FREE
    stack, seen = [(0, 0)], {(0, 0)}
    while stack:
        r, c = stack[-1]
        options = unvisited_rooms(r, c, m, seen)
        if not options:  # a dead end: back up
            stack.pop()
            continue
        nr, nc = options[lcg.below(len(options))]
        grid[2 * nr + 1][2 * nc + 1] = FREE  # the new room
        grid[r + nr + 1][c + nc + 1] = FREE  # the wall between the two rooms
        seen.add((nr, nc))
        stack.append((nr, nc))
    inner_walls = []
    for r in range(1, n - 1):
        for c in range(1, n - 1):
            if grid[r][c] == WALL and r % 2 != c % 2:  # between two rooms
                inner_walls.append((r, c))
    for _ in range(max(1, m * m // 25)):
        r, c = inner_walls.pop(lcg.below(len(inner_walls)))
        grid[r][c] = FREE
    return "\n".join("".join(row) for row in grid)


def unvisited_rooms(r, c, m, seen):
    """The rooms next to room (r, c) of m x m that are not in `seen`, in MOVES' order."""
    options = []
    for dr, dc in MOVES.tolist():
        room = (r + dr, c + dc)
        inside = 0 <= room[0] < m and 0 <= room[1] < m
        if inside and room not in seen:
            options.append(room)
    return options


def parse_layout(text):
    """ASCII rows -> (H, W) array of map characters, checked; raises ValueError."""
    rows = [row.rstrip() for row in text.strip("\n").split("\n")]
    for i, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise ValueError(f"layout rows differ in length: row {i} has {len(row)} "
                             f"characters, row 0 has {len(rows[0])}")
    for i, row in enumerate(rows):  # in Python: numpy's string compares can lose a Ctrl-C
        unknown = [j for j, char in enumerate(row) if char not in CELL_CHARS]
        if unknown:
            j = unknown[0]
            known = ", ".join(f"'{k}' {v}" for k, v in CELL_CHARS.items())
            raise ValueError(f"unknown character {row[j]!r} at row {i}, column {j} (0-based); "
                             f"known: {known}")
    grid = np.array([list(row) for row in rows])
    if (grid != WALL).sum() < 2:
        raise ValueError("layout has fewer than two free cells")
    return grid


def load_layout(spec):
    """A layout name, `maze<N>`, a file path, or map text -> the checked map text.
    Cells outside the map count as walls, so a border of '#' is optional."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"layout must be a name, a path or map text, got {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec in LAYOUTS:
        text = LAYOUTS[spec]
    elif "\n" in spec:
        text = spec
    elif re.fullmatch(r"maze\d+", spec):
        text = generate_maze(maze_size(spec))
    elif os.path.sep in spec or "." in spec or os.path.exists(spec):
        text = read_layout_file(spec)
    else:
        raise ValueError(f"unknown layout {spec!r}; known: {', '.join(LAYOUTS)}, "
                         "maze<N> (odd N >= 7), or a path to a map file")
    grid = parse_layout(text)
    return "\n".join("".join(row) for row in grid)


def maze_size(spec):
    """N of `maze<N>`, checked: odd, 7 to 1001."""
    n = int(spec[4:])
    if n < 7 or n > 1001 or n % 2 == 0:
        raise ValueError(f"{spec}: a generated maze needs an odd size 7 <= N <= 1001, "
                         "e.g. maze25")
    return n


def read_layout_file(path):
    """A map file's text; ValueError if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        what = "unreadable"
        if isinstance(e, FileNotFoundError):
            what = "not found"
        raise ValueError(f"layout file {what}: {path} ({type(e).__name__})") from None


# --------------------------------------------------------------------- ground truth
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
    here = np.arange(len(cells))[:, None]  # (N, 1)
    target = cells[:, None, :] + MOVES[None, :, :]  # (N, 4, 2)
    inside = ((target >= 0) & (target < grid.shape)).all(-1)  # (N, 4)
    target = np.where(inside[..., None], target, cells[:, None, :])  # off the map: stay
    nxt = index[target[..., 0], target[..., 1]]  # (N, 4), -1 into a wall
    nxt = np.where(nxt >= 0, nxt, here)  # into a wall: stay
    for char, action in ONE_WAY.items():  # a one-way cell: every other action stays
        one_way = index[grid == char][:, None]  # (K, 1)
        others = np.flatnonzero(np.arange(4) != action)[None]  # (1, 3)
        nxt[one_way, others] = one_way
    return _frozen(cells), _frozen(index), _frozen(nxt)


@functools.lru_cache(maxsize=16)
def _distances(text):
    """All-pairs BFS, all sources at once: d[i, j] = fewest actions from i to j, or -1.
    A BFS level is one row gather per action: target j joins source i's frontier if a
    predecessor k (nxt[k, a] = j) was in it. No per-pair Python work."""
    _, _, nxt = _transitions(text)
    n = len(nxt)
    pred = np.full((n + 1, 4), n)  # pred[j, a]: the cell a moves into j (n, padding: none)
    k, a = np.nonzero(nxt != np.arange(n)[:, None])
    pred[nxt[k, a], a] = k
    dist = np.full((n, n), -1, dtype=np.int32)  # (target, source) while building
    frontier = np.zeros((n + 1, n), dtype=bool)  # (target + padding row, source)
    frontier[np.arange(n), np.arange(n)] = True
    reached, level = frontier[:n].copy(), 0
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
    closer = after == d[:, :, None] - 1
    reachable = d[:, :, None] > 0
    return _frozen(closer & reachable)


# ---------------------------------------------------------------------- environment
class GridWorld(gymnasium.Env):
    """The gridworld of the module docstring; its ground truth, cached, read-only, N cells:
        cells               (N, 2) int   (row, col) of each free cell
        index               (H, W) int   cell index of (row, col), -1 on walls
        one_way             (H, W) bool  the one-way cells
        transitions()       (N, 4) int   next cell index for each cell and action
        distance_matrix()   (N, N) int32 fewest actions from i to j, -1 if unreachable
        optimal_actions()   (N, N, 4) bool  actions from i on a shortest path to j
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, layout="maze", render_mode=None, slip=0.0):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}")
        if not isinstance(slip, numbers.Real) or not 0 <= slip <= 1:
            raise ValueError(f"slip must be a number in [0, 1], got {slip!r}")
        self.slip, self.render_mode = slip, render_mode
        self.layout = load_layout(layout)
        self.grid = parse_layout(self.layout)  # (H, W) map characters
        self.height, self.width = self.grid.shape
        self.one_way = np.zeros(self.grid.shape, dtype=bool)  # (H, W) the one-way cells
        for char in ONE_WAY:
            self.one_way |= self.grid == char
        self.cells, self.index, _ = _transitions(self.layout)
        cell = gymnasium.spaces.MultiDiscrete([self.height, self.width])
        self.observation_space = gymnasium.spaces.Dict(
            {"observation": cell, "achieved_goal": cell, "desired_goal": cell})
        self.action_space = gymnasium.spaces.Discrete(4)
        self.agent = self.goal = 0  # cell indices

    def transitions(self):
        return _transitions(self.layout)[2]

    def distance_matrix(self):
        return _distances(self.layout)

    def optimal_actions(self):
        return _optimal_actions(self.layout)

    def cell_indices(self, rc):
        """(row, col) int pairs (B, 2) -> cell indices (B,); one pair (2,) -> an int.
        TypeError for non-integers, ValueError for another shape or a cell that is not free."""
        a = np.asarray(rc)
        if a.dtype.kind not in "iu":
            raise TypeError(f"cells must be integer (row, col) pairs, got {rc!r:.60}")
        if a.ndim not in (1, 2) or a.shape[-1] != 2:
            raise ValueError(f"cells must have shape (2,) or (B, 2), got shape {a.shape}")
        flat = a.reshape(-1, 2)
        inside = ((flat >= 0) & (flat < self.grid.shape)).all(1)
        index = np.full(len(flat), -1)
        index[inside] = self.index[flat[inside, 0], flat[inside, 1]]
        if (index < 0).any():
            bad = tuple(flat[index < 0][0].tolist())
            raise ValueError(f"{bad} is not a free cell of this map")
        if a.ndim == 1:
            return int(index[0])
        return index

    def _obs(self):
        agent, goal = self.cells[self.agent].copy(), self.cells[self.goal].copy()
        return {"observation": agent, "achieved_goal": agent.copy(), "desired_goal": goal}

    def _info(self):
        return {"distance": int(self.distance_matrix()[self.agent, self.goal])}

    def reset(self, *, seed=None, options=None):
        """Start and goal uniform over ordered pairs of distinct connected cells; options
        {"start": (r, c), "goal": (r, c)} fixes either or both."""
        super().reset(seed=seed)
        options = options or {}
        unknown = set(options) - {"start", "goal"}
        if unknown or any(np.shape(v) != (2,) for v in options.values()):
            raise ValueError(f"options are 'start' and 'goal', each one (row, col); got {options}")
        start = goal = None
        if "start" in options:
            start = self.cell_indices(options["start"])
        if "goal" in options:
            goal = self.cell_indices(options["goal"])
        pairs = self.distance_matrix() > 0  # (N, N): a path from s to g, s != g
        possible = pairs
        if start is not None:
            possible = possible[start]
        if goal is not None:
            possible = possible[..., goal]
        if not possible.any():
            raise ValueError(f"goal not reachable from the start (or the same cell): {options}")
        s, g = start, goal
        while s is None or g is None or not pairs[s, g]:  # rejection sampling: uniform pairs
            if start is None:
                s = int(self.np_random.integers(len(pairs)))
            if goal is None:
                g = int(self.np_random.integers(len(pairs)))
        self.agent, self.goal = s, g
        return self._obs(), self._info()

    def step(self, action):
        a = np.asarray(action)
        if a.ndim or a.dtype.kind not in "iu" or not 0 <= a < 4:
            raise ValueError(f"action must be one integer, 0 up, 1 right, 2 down or 3 left, "
                             f"got {action!r:.60}")
        action = int(a)
        if self.slip and self.np_random.random() < self.slip:  # one of the other three
            action = (action + 1 + int(self.np_random.integers(3))) % 4
        self.agent = int(self.transitions()[self.agent, action])
        reached = self.agent == self.goal
        return self._obs(), float(reached), reached, False, self._info()

    def compute_reward(self, achieved_goal, desired_goal, info):  # Gymnasium-Robotics'
        same = np.asarray(achieved_goal) == np.asarray(desired_goal)
        return np.all(same, axis=-1).astype(float)

    def render(self):
        if self.render_mode == "ansi":
            grid = self.grid.copy()
            grid[tuple(self.cells[self.goal])] = "G"
            grid[tuple(self.cells[self.agent])] = "A"
            return "\n".join("".join(row) for row in grid)
        if self.render_mode == "rgb_array":
            colors = self.colors()
            colors[tuple(self.cells[self.goal])] = [40, 170, 60]
            colors[tuple(self.cells[self.agent])] = AGENT
            return colors.repeat(8, axis=0).repeat(8, axis=1)  # 8 pixels a cell

    def colors(self):
        """(H, W, 3) uint8: the map's colour per cell, walls dark, one-way cells orange."""
        colors = np.full((*self.grid.shape, 3), 235, dtype=np.uint8)  # free: light grey
        colors[self.grid == WALL] = 40
        colors[self.one_way] = [235, 200, 120]
        return colors

    @functools.lru_cache(maxsize=4)  # maze51: seconds of checks
    def held_out(self, share, seed):
        """(N,) bool: round(share * N) cells, seeded, such that the other cells stay connected
        (a move counts both ways): a test of unseen cells, not of a corridor cut in two."""
        queue = list(np.random.default_rng(seed).permutation(len(self.cells)))
        held = np.zeros(len(self.cells), dtype=bool)
        refused = 0  # in a row: when every cell left would cut the map, stop
        while held.sum() < round(share * len(self.cells)) and refused < len(queue):
            cell = queue.pop(0)
            held[cell] = True
            if not _connected(self.transitions(), ~held):
                held[cell] = False  # it joins the others now; maybe not once its neighbours go
                queue.append(cell)
            refused = 0 if held[cell] else refused + 1
        return held


def _connected(nxt, keep):
    """Whether the cells in keep (N,) bool reach each other by moves inside keep, either way."""
    reached = np.arange(len(keep)) == np.argmax(keep)  # (N,) one kept cell
    while True:
        grown = reached | reached[nxt].any(1)  # one move backwards,
        grown[nxt[reached]] = True  # and forwards
        grown &= keep
        if (grown == reached).all():
            return (reached == keep).all()
        reached = grown


# ---------------------------------------------------------------------- images
class ImageObservation(gymnasium.ObservationWrapper, gymnasium.utils.RecordConstructorArgs):
    """Observations as RGB images of the map, `tile` pixels a cell (as MiniGrid's
    RGBImgObsWrapper), (H * tile, W * tile, 3) uint8: `observation`, `achieved_goal`: the map,
    the agent's cell blue; `desired_goal`: the agent at the goal, as the authors' MiniGrid code
    draws a goal (theirs marks the goal in every image too; not here: phi(s) sees s alone)."""

    def __init__(self, env, tile=8):
        gymnasium.utils.RecordConstructorArgs.__init__(self, tile=tile)  # check_env remakes it
        gymnasium.ObservationWrapper.__init__(self, env)
        self.tile = tile
        height, width = env.unwrapped.grid.shape
        image = gymnasium.spaces.Box(0, 255, (height * tile, width * tile, 3), np.uint8)
        keys = ("observation", "achieved_goal", "desired_goal")
        self.observation_space = gymnasium.spaces.Dict(dict.fromkeys(keys, image))

    def observation(self, observation):
        cells = {key: self.unwrapped.cell_indices(rc) for key, rc in observation.items()}
        return {key: self.images([cell])[0] for key, cell in cells.items()}

    def images(self, cells):
        """Cell indices (B,) -> (B, H * tile, W * tile, 3) uint8: the map, the agent in each."""
        env = self.unwrapped
        pictures = np.repeat(env.colors()[None], len(cells), axis=0)  # (B, H, W, 3)
        rows, cols = env.cells[np.asarray(cells)].T
        pictures[np.arange(len(cells)), rows, cols] = AGENT
        return pictures.repeat(self.tile, axis=1).repeat(self.tile, axis=2)


if "GridWorld-v0" not in gymnasium.registry:
    gymnasium.register(id="GridWorld-v0", entry_point=GridWorld, max_episode_steps=1000)

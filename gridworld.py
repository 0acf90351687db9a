"""A tabular, goal-conditioned gridworld with exact shortest-path ground truth.

## Description
An agent moves between the free cells of a map to a goal cell. The whole MDP fits in a
table, and breadth-first search gives the exact distance (fewest actions) between any two
cells: the truth metricrl.py measures against. `gymnasium.make("GridWorld-v0")`. Every map,
2-D or d-dimensional, is its cells (N, D coordinates) and its moves (A, D steps).

## Action Space
ASCII maps: `Discrete(4)`, 0 up, 1 right, 2 down, 3 left; a hypermaze: `Discrete(3^d)`, each
coordinate -1, 0 or +1 (staying put included; the authors' order). Into a wall or off the
map, the agent stays. A one-way cell (`^ > v <`) is left only in its arrow's direction:
actions are then not invertible, and `distance_matrix()` is from row to column.
Key-and-door maps (`K`, `D`; `doorkey`): 4 picks up, 5 opens; a state: (row, col, key, door).

## Observation Space
A `Dict` (Gymnasium-Robotics' goal-conditioned convention) of int64 coordinates, shape (D,):
`observation` and `achieved_goal` (the agent), `desired_goal` (the goal); on 2-D maps as
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
text file of ASCII rows, the rows as one string, or `hypermaze<d>[s<n>]` (`hypermaze()`).
`render_mode`: None, "ansi" or "rgb_array" (d > 2: the 2-D slice through the agent).
`slip`: the probability that a move goes in one of the other directions.
"""
import functools
import itertools
import numbers
import os
import re

import gymnasium
import numpy as np

MOVES = np.array([(-1, 0), (0, 1), (1, 0), (0, -1)])  # ASCII maps': up, right, down, left
WALL, FREE = "#", "."  # map characters
KEY, DOOR, OPEN = "K", "D", "/"  # a key and a locked door (a key-and-door map); the door open
AGENT = (30, 90, 220)  # the agent's colour in images
ONE_WAY = {"^": 0, ">": 1, "v": 2, "<": 3}  # one-way cells, left only by this action
ONE_WAY_NAMES = {char: f"one-way cell (left only by action {a})" for char, a in ONE_WAY.items()}
CELL_CHARS = {WALL: "wall", FREE: "free cell", **ONE_WAY_NAMES, KEY: "key (picked up, action 4)",
              DOOR: "locked door (opened with the key, action 5)"}  # for error messages
BLOCKED = (WALL, KEY, DOOR)  # a key lying in its cell, a closed door: the agent cannot enter
DOORKEY_MOVES = np.array([(-1, 0, 0, 0), (0, 1, 0, 0), (1, 0, 0, 0), (0, -1, 0, 0),
                          (0, 0, 1, 0), (0, 0, 0, 1)])  # the 4 moves, pick up, toggle

LAYOUTS = {  # the named maps, as ASCII rows
    # An empty room: 8 x 8 free cells, diameter 14.
    "open": "\n".join(["#" * 10] + ["#........#"] * 8 + ["#" * 10]),
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
}
# The authors' KeyEnv (miniGrid/): a 10 x 10 room split by a wall, its door locked; the key
# where their commented-out line put it (departure: they draw its place anew each episode).
LAYOUTS["doorkey"] = "\n".join(["#" * 10] + ["#....#...#"] * 5 + ["#..K.D...#"]
                                + ["#....#...#"] * 2 + ["#" * 10])
_rows = LAYOUTS["rooms"].split("\n")  # map row r is _rows[r + 1]
_rows[4], _rows[11] = "#.....>.....#", "#.....<.....#"  # doors (3, 6) and (10, 6) one-way
LAYOUTS["oneway"] = "\n".join(_rows)  # the four rooms as a circulation, clockwise


# ----------------------------------------------------------------------------- maps
def lcg(state):
    """Numbers in [0, 2^31) from a 64-bit linear congruential generator (Knuth's MMIX
    constants): the same on every machine and Python, and no global RNG touched."""
    while True:
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        yield state >> 33


def generate_maze(n):
    """An n x n maze (outer wall included, n odd >= 7), the same on every machine: a
    depth-first backtracker carves a perfect maze through m x m rooms on the odd cells, then
    one wall in 25 between two rooms is knocked out, for loops. Seeded by n."""
    if n < 7 or n > 1001 or n % 2 == 0:
        raise ValueError(f"maze{n}: a generated maze needs an odd size 7 <= N <= 1001, e.g. maze25")
    m = (n - 1) // 2  # rooms a side: room (r, c) is cell (2r + 1, 2c + 1)
    numbers = lcg(n)
    grid = [[WALL] * n for _ in range(n)]
    grid[1][1] = FREE
    stack, seen = [(0, 0)], {(0, 0)}
    while stack:
        r, c = stack[-1]
        options = [(r + dr, c + dc) for dr, dc in MOVES.tolist()]  # the rooms beside, in order
        options = [room for room in options if 0 <= min(room) and max(room) < m]  # on the map
        options = [room for room in options if room not in seen]
        if not options:  # a dead end: back up
            stack.pop()
            continue
        nr, nc = options[next(numbers) % len(options)]
        grid[2 * nr + 1][2 * nc + 1] = FREE  # the new room
        grid[r + nr + 1][c + nc + 1] = FREE  # the wall between the two rooms
        seen.add((nr, nc))
        stack.append((nr, nc))
    inside = range(1, n - 1)  # the rows, and the columns, inside the outer wall
    between = [(r, c) for r in inside for c in inside if (r + c) % 2]  # between two rooms
    inner_walls = [(r, c) for r, c in between if grid[r][c] == WALL]
    for _ in range(max(1, m * m // 25)):
        r, c = inner_walls.pop(next(numbers) % len(inner_walls))
        grid[r][c] = FREE
    return "\n".join("".join(row) for row in grid)


def parse_layout(text):
    """ASCII rows -> (H, W) array of map characters, checked; raises ValueError."""
    rows = [row.rstrip() for row in text.strip("\n").split("\n")]
    known = ", ".join(f"'{k}' {v}" for k, v in CELL_CHARS.items())
    for i, row in enumerate(rows):  # in Python: numpy's string compares can lose a Ctrl-C
        if len(row) != len(rows[0]):
            raise ValueError(f"layout rows differ in length: row {i} has {len(row)} "
                             f"characters, row 0 has {len(rows[0])}")
        unknown = [j for j, char in enumerate(row) if char not in CELL_CHARS]
        if unknown:
            j = unknown[0]
            raise ValueError(f"unknown character {row[j]!r} at row {i}, column {j} (0-based); "
                             f"known: {known}")
    grid = np.array([list(row) for row in rows])
    if (grid != WALL).sum() < 2:
        raise ValueError("layout has fewer than two free cells")
    keys, doors = (grid == KEY).sum(), (grid == DOOR).sum()
    if keys + doors and not keys == doors == 1:
        raise ValueError("a key-and-door map needs one 'K' and one 'D'")
    return grid


def load_layout(spec):
    """A name, `maze<N>`, a file path or map text -> the checked map text (hypermaze: its name).
    Cells outside the map count as walls, so a border of '#' is optional."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"layout must be a name, a path or map text, got {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec in LAYOUTS:
        text = LAYOUTS[spec]
    elif "\n" in spec:
        text = spec
    elif re.fullmatch(r"maze\d+", spec):
        text = generate_maze(int(spec[4:]))
    elif re.fullmatch(r"hypermaze\d+(s\d+)?", spec):
        world(spec)  # checked (and kept: world() is cached)
        return spec
    elif os.path.sep in spec or "." in spec or os.path.exists(spec):
        text = read_layout_file(spec)
    else:
        raise ValueError(f"unknown layout {spec!r}; known: {', '.join(LAYOUTS)}, maze<N> "
                         "(odd N >= 7), hypermaze<d>[s<n>], or a path to a map file")
    grid = parse_layout(text)
    return "\n".join("".join(row) for row in grid)


def hypermaze(spec):
    """`hypermaze<d>s<n>` (n = 10 if not given) -> the authors' HyperCube, (n,) * d cells: walls
    in two slabs, x_0 in [0.2 n, 0.4 n) and every other x_i in [0, 0.8 n); x_0 in [0.6 n, 0.8 n)
    and every other x_i in [0.2 n, n) (int() as theirs). (3n)^d, the moves' table, < 2^24."""
    d, _, n = spec[9:].partition("s")
    d, n = int(d), int(n or 10)
    if d < 2 or d > 24 or n < 5 or (3 * n) ** d > 2**24:  # d first: no huge power
        raise ValueError(f"{spec}: a hypermaze needs d >= 2 dimensions, n >= 5 cells a side and "
                         "(3n)^d < 2^24, e.g. hypermaze4 or hypermaze5s5")
    grid = np.full((n,) * d, FREE)
    for first, other in (((0.2, 0.4), (0.0, 0.8)), ((0.6, 0.8), (0.2, 1.0))):
        spans = [first] + [other] * (d - 1)  # (low, high) shares of n, per coordinate
        slab = [slice(int(low * n), int(high * n)) for low, high in spans]
        grid[tuple(slab)] = WALL
    return grid


@functools.lru_cache(maxsize=16)
def world(layout):
    """A checked layout (load_layout's) -> its map characters, (H, W) or (n,) * d, read-only,
    and its moves (A, D): ASCII maps the 4 MOVES, a hypermaze all 3^d steps in {-1, 0, 1}^d."""
    if not layout.startswith("hypermaze"):
        grid = parse_layout(layout)
        if (grid == KEY).any():  # states (row, col, key carried, door open)
            return _frozen(doorkey(grid)), DOORKEY_MOVES
        return _frozen(grid), MOVES
    grid = hypermaze(layout)
    moves = itertools.product((-1, 0, 1), repeat=grid.ndim)  # (3^d, d)
    return _frozen(grid), np.array(list(moves))


def doorkey(grid):
    """A key-and-door map (H, W) -> its states (H, W, 2, 2), [row, col, key carried, door open]:
    the key's cell free once carried, the door's once open; no open door without the key."""
    states = np.repeat(np.repeat(grid[..., None, None], 2, axis=2), 2, axis=3)
    carried, opened = states[:, :, 1, :], states[:, :, :, 1]  # views
    carried[carried == KEY] = FREE
    opened[opened == DOOR] = OPEN
    states[:, :, 0, 1] = WALL
    return states


def beside(grid, char):
    """(H, W) bool: a 4-neighbour of the cell is `char` (the key, the door) on the map grid."""
    found = np.pad(grid == char, 1)
    return found[:-2, 1:-1] | found[2:, 1:-1] | found[1:-1, :-2] | found[1:-1, 2:]


def read_layout_file(path):
    """A map file's text; ValueError if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        what = "not found" if isinstance(e, FileNotFoundError) else "unreadable"
        raise ValueError(f"layout file {what}: {path} ({type(e).__name__})") from None


# --------------------------------------------------------------------- ground truth
def _frozen(array):
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=16)
def _transitions(layout):
    """-> cells (N, D), index grid (the map's shape) with -1 on walls, next cell (N, A)."""
    grid, moves = world(layout)
    free = ~np.isin(grid, BLOCKED)
    cells = np.argwhere(free)  # (N, D), row-major order
    index = np.full(grid.shape, -1)
    index[free] = np.arange(len(cells))
    here = np.arange(len(cells))[:, None]  # (N, 1)
    target = cells[:, None, :] + moves[None, :, :]  # (N, A, D)
    inside = ((target >= 0) & (target < grid.shape)).all(-1)  # (N, A)
    target = np.where(inside[..., None], target, cells[:, None, :])  # off the map: stay
    nxt = index[tuple(np.moveaxis(target, -1, 0))]  # (N, A), -1 into a wall
    nxt = np.where(nxt >= 0, nxt, here)  # into a wall: stay
    for char, action in ONE_WAY.items():  # a one-way cell: every other action stays
        one_way = index[grid == char][:, None]  # (K, 1)
        others = np.flatnonzero(np.arange(4) != action)[None]  # (1, 3)
        nxt[one_way, others] = one_way
    if (grid == KEY).any():  # a key-and-door map: pick up and toggle only beside them
        for action, char in ((4, KEY), (5, DOOR)):  # (departure: theirs toggles to the right)
            near = beside(grid[:, :, 0, 0], char)[cells[:, 0], cells[:, 1]]  # (N,)
            nxt[~near, action] = here[~near, 0]
    return _frozen(cells), _frozen(index), _frozen(nxt)


@functools.lru_cache(maxsize=16)
def _distances(layout):
    """The map's all-pairs BFS, cached, read-only."""
    return _frozen(bfs(_transitions(layout)[2]))


def bfs(nxt):
    """All-pairs BFS over the moves nxt (N, A), all sources at once: d[i, j] = fewest actions
    from i to j, or -1. A BFS level is one row gather per action: target j joins source i's
    frontier if a predecessor k (nxt[k, a] = j) was in it; the sources packed 8 a byte."""
    n = len(nxt)
    pred = np.full((n + 1, nxt.shape[1]), n)  # pred[j, a]: the cell a moves into j (n: none)
    k, a = np.nonzero(nxt != np.arange(n)[:, None])
    pred[nxt[k, a], a] = k
    dist = np.full((n, n), -1, dtype=np.int32)  # (target, source) while building
    frontier = np.packbits(np.eye(n + 1, n, dtype=bool), axis=1)  # (target + padding, source)
    reached, level = frontier.copy(), 0
    while frontier.any():
        dist[np.unpackbits(frontier[:n], axis=1, count=n).view(bool)] = level
        step = np.zeros_like(frontier)  # its padding row stays empty
        for a in range(nxt.shape[1]):
            step[:n] |= frontier[pred[:n, a]]  # row gather
        frontier = step & ~reached
        reached |= frontier
        level += 1
    return np.ascontiguousarray(dist.T)  # (source, target)


def shortest_moves(nxt, d, s, g):
    """Cell indices s, g (B,) -> (B, A) bool: the actions a from s on a shortest path to g over
    the moves nxt (N, A) with their BFS d (N, N), d(next(s, a), g) = d(s, g) - 1."""
    after = nxt[s]  # (B, A) the next cells
    to_go = d[s, g][:, None]  # (B, 1) d(s, g); -1: out of reach
    closer = d[after, g[:, None]] == to_go - 1  # (B, A)
    return closer & (to_go > 0)


# ---------------------------------------------------------------------- environment
class GridWorld(gymnasium.Env):
    """The gridworld of the module docstring; grid, its characters, (H, W) or (n,) * d; its
    ground truth, cached, read-only; N cells, D coordinates each (row, col), A moves:
        moves               (A, D) int   each action's step
        cells               (N, D) int   the coordinates of each free cell
        index               shape  int   cell index of each coordinate, -1 on walls
        one_way             shape  bool  the one-way cells
        transitions()       (N, A) int   next cell index for each cell and action
        distance_matrix()   (N, N) int32 fewest actions from i to j, -1 if unreachable
        optimal_actions()   (N, N, A) bool  actions from i on a shortest path to j; (s, g): (B, A)
        task()              start, goals    a key-and-door map's task (the paper's Fig. 1)
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, layout="maze", render_mode=None, slip=0.0):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}")
        if not isinstance(slip, numbers.Real) or not 0 <= slip <= 1:
            raise ValueError(f"slip must be a number in [0, 1], got {slip!r}")
        self.slip, self.render_mode = slip, render_mode
        self.layout = load_layout(layout)
        self.grid, self.moves = world(self.layout)
        self.height, self.width = self.grid.shape[:2]  # of a 2-D map, or of a slice
        self.one_way = np.isin(self.grid, list(ONE_WAY))
        self.cells, self.index, _ = _transitions(self.layout)
        cell = gymnasium.spaces.MultiDiscrete(self.grid.shape)
        self.observation_space = gymnasium.spaces.Dict(
            {"observation": cell, "achieved_goal": cell, "desired_goal": cell})
        self.action_space = gymnasium.spaces.Discrete(len(self.moves))
        self.agent = self.goal = 0  # cell indices

    def transitions(self):
        return _transitions(self.layout)[2]

    def distance_matrix(self):
        return _distances(self.layout)

    def optimal_actions(self, s=None, g=None):
        """Cell indices s, g (B,) -> (B, A) bool: the actions a from s on a shortest path to
        g, d(next(s, a), g) = d(s, g) - 1. No s, g: all pairs, (N, N, A), on small maps."""
        n = len(self.cells)
        if s is None:
            return self.optimal_actions(*np.divmod(np.arange(n * n), n)).reshape(n, n, -1)
        s, g = np.asarray(s), np.asarray(g)
        return shortest_moves(self.transitions(), self.distance_matrix(), s, g)

    def task(self):
        """The paper's task (Fig. 1) on a key-and-door map: from the first state with no key and
        the door closed (doorkey's top left) to each state past the door -> start, goals (G,)."""
        if not (self.grid == KEY).any():
            return None
        start = int(np.flatnonzero((self.cells[:, 2:] == 0).all(1))[0])  # no key, door closed
        reach = self.distance_matrix()[start] >= 0  # (N,)
        shut = self.cells[reach & (self.cells[:, 3] == 0)]  # the states reached, door closed
        closed = np.zeros((self.height, self.width), dtype=bool)
        closed[shut[:, 0], shut[:, 1]] = True
        rows, cols = self.cells[:, :2].T
        beyond = reach & ~closed[rows, cols] & (self.grid[rows, cols, 0, 0] != DOOR)
        return (start, np.flatnonzero(beyond)) if beyond.any() else None  # a door to go around

    def cell_indices(self, rc):
        """Coordinates (B, D), ints -> cell indices (B,); one cell's (D,) -> an int.
        TypeError for non-integers, ValueError for another shape or a cell that is not free."""
        a = np.asarray(rc)
        dims = self.grid.ndim
        if a.dtype.kind not in "iu":
            raise TypeError(f"cells must be integer coordinates, got {rc!r:.60}")
        if a.ndim not in (1, 2) or a.shape[-1] != dims:
            raise ValueError(f"cells must have shape ({dims},) or (B, {dims}), got shape {a.shape}")
        flat = a.reshape(-1, dims)
        inside = ((flat >= 0) & (flat < self.grid.shape)).all(1)
        index = np.full(len(flat), -1)
        index[inside] = self.index[tuple(flat[inside].T)]
        if (index < 0).any():
            bad = tuple(flat[index < 0][0].tolist())
            raise ValueError(f"{bad} is not a free cell of this map")
        return int(index[0]) if a.ndim == 1 else index

    def _obs(self):
        agent, goal = self.cells[self.agent].copy(), self.cells[self.goal].copy()
        return {"observation": agent, "achieved_goal": agent.copy(), "desired_goal": goal}

    def _info(self):
        return {"distance": int(self.distance_matrix()[self.agent, self.goal])}

    def reset(self, *, seed=None, options=None):
        """Start and goal uniform over ordered pairs of distinct connected cells; options
        {"start": (r, c), "goal": (r, c)} (d coordinates on a hypermaze) fixes either or both."""
        super().reset(seed=seed)
        options = options or {}
        unknown = set(options) - {"start", "goal"}
        if unknown or any(np.shape(v) != (self.grid.ndim,) for v in options.values()):
            raise ValueError(f"options are 'start' and 'goal', each one cell's coordinates; "
                             f"got {options}")
        any_cell = slice(None)  # as an index: every cell
        start, goal = [self.cell_indices(options[key]) if key in options else any_cell
                       for key in ("start", "goal")]
        pairs = self.distance_matrix() > 0  # (N, N): a path from s to g, s != g
        if not pairs[start, goal].any():
            raise ValueError(f"goal not reachable from the start (or the same cell): {options}")
        s, g = start, goal
        while s is any_cell or g is any_cell or not pairs[s, g]:  # rejection sampling:
            if start is any_cell:  # uniform over the pairs
                s = int(self.np_random.integers(len(pairs)))
            if goal is any_cell:
                g = int(self.np_random.integers(len(pairs)))
        self.agent, self.goal = s, g
        return self._obs(), self._info()

    def step(self, action):
        a = np.asarray(action)
        actions = len(self.moves)
        if a.ndim or a.dtype.kind not in "iu" or not 0 <= a < actions:
            raise ValueError(f"action must be one integer in [0, {actions}) (ASCII maps: 0 up, "
                             f"1 right, 2 down, 3 left), got {action!r:.60}")
        action = int(a)
        if self.slip and self.np_random.random() < self.slip:  # one of the other actions
            action = (action + 1 + int(self.np_random.integers(actions - 1))) % actions
        self.agent = int(self.transitions()[self.agent, action])
        reached = self.agent == self.goal
        return self._obs(), float(reached), reached, False, self._info()

    def compute_reward(self, achieved_goal, desired_goal, info):  # Gymnasium-Robotics'
        same = np.asarray(achieved_goal) == np.asarray(desired_goal)
        return np.all(same, axis=-1).astype(float)

    def render(self):
        """The map, or a hypermaze's 2-D slice through the agent (the goal if it lies there)."""
        agent, goal = self.cells[self.agent], self.cells[self.goal]
        goal_shows = (goal[2:] == agent[2:]).all()
        plane = (slice(None), slice(None), *agent[2:])  # the first two coordinates vary
        if self.render_mode == "ansi":
            grid = self.grid[plane].copy()
            if goal_shows:
                grid[tuple(goal[:2])] = "G"
            grid[tuple(agent[:2])] = "A"
            return "\n".join("".join(row) for row in grid)
        if self.render_mode == "rgb_array":
            colors = self.colors(plane)
            if goal_shows:
                colors[tuple(goal[:2])] = [40, 170, 60]
            colors[tuple(agent[:2])] = AGENT
            return colors.repeat(8, axis=0).repeat(8, axis=1)  # 8 pixels a cell

    def colors(self, plane=()):
        """(H, W, 3) uint8: each cell's colour (of a slice, plane), walls dark, one-way orange."""
        colors = np.full((self.height, self.width, 3), 235, dtype=np.uint8)  # free: light grey
        colors[self.grid[plane] == WALL] = 40
        colors[self.one_way[plane]] = [235, 200, 120]
        for char, rgb in ((KEY, (230, 190, 40)), (DOOR, (140, 80, 30)), (OPEN, (210, 180, 140))):
            colors[self.grid[plane] == char] = rgb  # the key gold, the door brown, open pale
        return colors

    def data_map(self, held, split=False):
        """The moves an offline dataset can make, (N, A), and their BFS, (N, N): a held-out cell
        (held (N,) bool) is a wall; split: a move across the map's left and right halves stays."""
        nxt, here = self.transitions(), np.arange(len(self.cells))[:, None]
        if not held.any() and not split:
            return nxt, self.distance_matrix()
        if split:
            right = 2 * self.cells[:, 1] >= self.width  # (N,)
            nxt = np.where(right[nxt] != right[here], here, nxt)
        nxt = np.where(held[nxt], here, nxt)
        return nxt, bfs(nxt)

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
        if env.unwrapped.grid.ndim != 2:
            raise ValueError("images are of 2-D maps, not of a hypermaze")
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

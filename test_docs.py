"""The pages a reader follows: README.md and docs/*.md. Every relative link and image resolves
(anchors included), every command in a fenced block parses with the flags it names, and
every committed figure is one that docs/figures.py knows how to redraw."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import experiments
import metricrl
import metricrl_continuous
from docs import figures

HERE = Path(__file__).parent
PAGES = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
LIVE = [page for page in PAGES if page.name != "history.md"]  # history: earlier commits' flags


def without_code(text):
    """The text with its fenced code blocks left out (a link there is code, not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation out, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    """The anchors of a page's headings."""
    headings = re.findall(r"^#{1,6} (.+)$", without_code(page.read_text(encoding="utf-8")), re.M)
    return {anchor(heading) for heading in headings}


def links(page):
    """(target, anchor) of each relative link and image of a page; web addresses left out."""
    found = re.findall(r"\]\(([^)\s]+)\)", without_code(page.read_text(encoding="utf-8")))
    for link in found:
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, fragment = link.partition("#")
        yield target, fragment


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_relative_link_and_image_resolves(page):
    count = 0
    for target, fragment in links(page):
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {target} does not exist"
        if fragment:
            assert fragment in anchors(path), f"{page.name}: no heading #{fragment} in {path.name}"
        count += 1
    assert count > 0 or page.name == "history.md", f"{page.name} links nowhere"


def commands(page):
    """The `python ...` and `pip ...` lines of a page's fenced bash blocks, comments off."""
    blocks = re.findall(r"^```bash\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)
    for block in blocks:
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(("python ", "pip ")):
                yield line


def check_command(line):
    """Raise (UsageError, AssertionError) unless the command's script exists and takes its flags."""
    argv = shlex.split(line)
    if argv[0] == "pip":
        assert argv[1:] == ["install", "-r", "requirements.txt"], line
        return
    script, flags = argv[1], argv[2:]
    if script == "metricrl.py":
        metricrl.check_args(metricrl.parse_args(flags, metricrl.Args)[0])
    elif script == "metricrl_continuous.py":
        knobs = metricrl.parse_args(flags, metricrl_continuous.Args)[0]
        metricrl_continuous.check_args(knobs)
    elif script == "experiments.py":
        knobs, given = metricrl.parse_args(flags, experiments.SweepArgs, "experiments.py")
        experiments.check_sweep(knobs, given)
    elif argv[1:3] == ["-m", "docs.figures"]:
        assert all(name in figures.FIGURES or name == "--list" for name in argv[3:]), line
    else:
        assert argv[1:3] == ["-m", "pytest"], f"a command the test does not know: {line}"


@pytest.mark.parametrize("page", LIVE, ids=[page.name for page in LIVE])
def test_every_command_in_a_fenced_block_parses(page):
    for line in commands(page):
        check_command(line)


def test_the_readme_runs_its_two_commands_and_stays_short():
    readme = HERE / "README.md"
    lines = list(commands(readme))
    assert "pip install -r requirements.txt" in lines and "python metricrl.py --env maze" in lines
    assert "python -m pytest" in lines  # what .ci/run runs
    text = readme.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 450 and "## Contents" in text


def test_a_bad_flag_in_a_command_is_caught():  # the check above can fail
    with pytest.raises(metricrl.UsageError):
        check_command("python metricrl.py --env maze --no-such-flag 1")
    with pytest.raises(metricrl.UsageError):
        check_command("python experiments.py --compare --assumptions")
    with pytest.raises(AssertionError):
        check_command("python -m docs.figures nothing.png")


def test_every_committed_figure_has_the_commands_that_draw_it():
    pngs = {path.name for path in (HERE / "docs" / "figures").glob("*.png")}
    assert pngs == set(figures.FIGURES), "docs/figures.py and docs/figures/ disagree"
    assert not list(HERE.glob("*.png")), "figures live in docs/figures/"
    for made_by, _ in figures.FIGURES.values():
        for line in made_by:
            check_command(line)


def test_an_unknown_figure_is_one_line_and_exit_code_2():
    result = subprocess.run([sys.executable, "-m", "docs.figures", "nothing.png"], cwd=HERE,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown figure 'nothing.png'" in result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""

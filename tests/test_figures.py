"""The report's pictures, read back as files: written beside comparison.md and linked from it, valid SVG,
and each drawn series where its numbers say it should be (tests/fixtures/events/seed-verdict: the seed's
two arms, validated at step 879, conservative training on into epoch 2)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gputwin.core import events as ev
from gputwin.faces import figures
from gputwin.core import state as st
from gputwin.faces.report import write_report

FIXTURE = Path(__file__).parent / "fixtures" / "events" / "seed-verdict"
NOW = 1767604312.0  # just after the recording's last event
ARMS = ("conservative", "aggressive")
SVG = "{http://www.w3.org/2000/svg}"
XLINK = "{http://www.w3.org/1999/xlink}"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed experiment's report, written once for the tests of this file."""
    folder = tmp_path_factory.mktemp("logs") / "pii-seed"
    shutil.copytree(FIXTURE, folder)
    write_report(folder, now=NOW)
    return folder


def group(root: ET.Element, gid: str) -> ET.Element:
    found = root.find(f".//{SVG}g[@id='{gid}']")
    assert found is not None, f"no series {gid!r} in the figure"
    return found


def path_points(element: ET.Element) -> list[list[tuple[float, float]]]:
    """Vertices of each <path> under an element (matplotlib writes 'M x y L x y ...')."""
    out = []
    for path in element.iter(f"{SVG}path"):
        numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", path.get("d", ""))]
        out.append(list(zip(numbers[::2], numbers[1::2])))
    return out


def marker_points(element: ET.Element) -> list[tuple[float, float]]:
    """Positions of the markers (<use x= y=>) under an element."""
    return [(float(u.get("x")), float(u.get("y"))) for u in element.iter(f"{SVG}use")]


def affine(data: list[float], pixels: list[float]) -> tuple[float, float]:
    """The pixel = a * value + b map through the first and last points; every point must lie on it."""
    a = (pixels[-1] - pixels[0]) / (data[-1] - data[0])
    b = pixels[0] - a * data[0]
    for value, pixel in zip(data, pixels):
        assert pixel == pytest.approx(a * value + b, abs=0.01)
    return a, b


def steps_and_losses(arm: str) -> tuple[list[int], list[float]]:
    events = ev.read_events(FIXTURE / arm / "events.jsonl").events
    steps = [e for e in events if e.kind == "step"]
    return [e["step"] for e in steps], [e["loss"] for e in steps]


def test_comparison_links_small_svg_figures_beside_it(report: Path):
    text = (report / "comparison.md").read_text(encoding="utf-8")
    section = re.search(r"^## Figures\n(.*?)(?=^## )", text, re.S | re.M).group(1)
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", section)
    assert links == ["comparison-loss.svg", "comparison-scores.svg"]
    assert "95% intervals" in section
    for name in links:
        path = report / name  # a relative link: the file lies beside comparison.md
        assert path.is_file()
        assert path.stat().st_size < 45_000, f"{name} is {path.stat().st_size} bytes"
        root = ET.parse(path).getroot()
        assert root.tag == f"{SVG}svg"
        assert not list(root.iter(f"{SVG}image"))  # drawn as vectors, no embedded raster
        assert "<dc:date>" not in path.read_text(encoding="utf-8")  # no date: the same run, the same bytes


def test_the_loss_figure_draws_each_arms_curves_validations_and_the_milestone(report: Path):
    root = ET.parse(report / figures.LOSS_FILE).getroot()
    texts = {"".join(t.itertext()) for t in root.iter(f"{SVG}text")}
    assert {"conservative", "aggressive", "raw", "smoothed (EMA 0.9)", "validation F1", "milestone 879"} <= texts

    smoothed = {arm: path_points(group(root, f"loss-smoothed-{arm}"))[0] for arm in ARMS}
    raw = {arm: path_points(group(root, f"loss-raw-{arm}"))[0] for arm in ARMS}
    for arm in ARMS:
        assert 50 < len(smoothed[arm]) == len(raw[arm]) <= figures.MAX_POINTS
        xs = [x for x, _ in smoothed[arm]]
        assert xs == sorted(set(xs)) and xs == [x for x, _ in raw[arm]]
    assert smoothed["conservative"][-1][0] > smoothed["aggressive"][-1][0]  # it trained further

    # Step -> x: one map for every curve; the last x is each arm's last logged step.
    last_steps = {arm: steps_and_losses(arm)[0][-1] for arm in ARMS}
    a, b = affine([last_steps["aggressive"], last_steps["conservative"]],
                  [smoothed["aggressive"][-1][0], smoothed["conservative"][-1][0]])
    milestone_x = path_points(group(root, "milestone-879"))[0][0][0]
    assert milestone_x == pytest.approx(a * 879 + b, abs=0.01)
    for arm in ARMS:  # the first point is the first bucket's last step: a handful of steps in
        assert 1 <= (smoothed[arm][0][0] - b) / a <= 20

    # Loss -> y: the smoothed curve ends at the bias-corrected EMA of every logged loss.
    ends = {}
    for arm in ARMS:
        ema = 0.0
        losses = steps_and_losses(arm)[1]
        for loss in losses:
            ema = 0.9 * ema + 0.1 * loss
        ends[arm] = ema / (1 - 0.9 ** len(losses))
    assert ends["conservative"] != pytest.approx(ends["aggressive"])
    slope, _ = affine([ends[a] for a in ARMS], [smoothed[a][-1][1] for a in ARMS])
    assert slope < 0  # a higher loss is drawn higher up

    # Validation F1 on its own axis: aggressive (87.7%) above conservative (83.8%).
    marks = {arm: marker_points(group(root, f"validation-{arm}")) for arm in ARMS}
    assert all(len(m) == 1 for m in marks.values())
    assert marks["aggressive"][0][1] < marks["conservative"][0][1]
    assert marks["aggressive"][0][0] == pytest.approx(milestone_x, abs=0.01)
    assert {"87.7%", "83.8%"} <= texts


def test_the_scores_figure_draws_each_type_with_its_interval(report: Path):
    root = ET.parse(report / figures.SCORES_FILE).getroot()
    validation = {arm: json.loads((FIXTURE / arm / "validation" / "step-000879.json").read_text()) for arm in ARMS}
    types = sorted(validation["conservative"]["per_type"])
    texts = {"".join(t.itertext()) for t in root.iter(f"{SVG}text")}
    total = validation["conservative"]["tp"] + validation["conservative"]["fn"]
    assert f"all types ({total:,})" in texts
    for etype in types:
        assert f"{etype} ({validation['conservative']['per_type'][etype]['support']:,})" in texts
    assert {"conservative (step 879)", "aggressive (step 879)", "F1 (goal 87.5%)", "recall (goal 90%)"} <= texts

    for metric in ("precision", "recall", "f1"):
        values, xs = [], []
        for arm in ARMS:
            points = marker_points(group(root, f"{metric}-{arm}"))
            assert len(points) == 1 + len(types)
            v = validation[arm]
            values += [v[metric], *(v["per_type"][t][metric] for t in types)]
            xs += [x for x, _ in points]
            bars = path_points(group(root, f"{metric}-interval-{arm}"))
            assert len(bars) == len(points)
            for (x, y), bar in zip(points, bars):
                (x0, y0), (x1, y1) = bar
                assert y0 == y1 == pytest.approx(y, abs=0.01)  # the bar is on its marker's row ...
                assert x0 <= x + 0.01 and x1 >= x - 0.01  # ... and spans it
        order = sorted(range(len(values)), key=lambda i: values[i])
        a, b = affine([values[i] * 100 for i in order], [xs[i] for i in order])
        assert a > 0
    # NAME is the hard type: its F1 interval is wide and lies left of EMAIL's.
    f1 = {t: p for t, p in zip(["all", *types], path_points(group(root, "f1-interval-aggressive")))}
    assert f1["NAME"][1][0] < f1["EMAIL"][0][0]


def test_figures_are_the_same_bytes_when_written_again(report: Path):
    before = {name: (report / name).read_bytes() for name in (figures.LOSS_FILE, figures.SCORES_FILE)}
    write_report(report, now=NOW + 60)
    assert {name: (report / name).read_bytes() for name in before} == before


def test_no_data_means_no_figures_and_stale_ones_removed(tmp_path: Path):
    (tmp_path / figures.LOSS_FILE).write_text("<svg/>")
    state = st.ExperimentState("empty", tmp_path, arms={"a": st.ArmState("a"), "b": st.ArmState("b")})
    assert figures.write_figures(tmp_path, state, {"a": None, "b": None}, None) == []
    assert not (tmp_path / figures.LOSS_FILE).exists()


def test_thin_merges_neighbours_and_keeps_the_newest_point():
    steps = list(range(1, 17))
    raw = [float(s) for s in steps]
    smoothed = [s / 10 for s in steps]
    # 16 points into 4: each point is four steps, raw their mean, smoothed the last one's
    assert figures.thin(steps, raw, smoothed, max_points=4) == ([4, 8, 12, 16], [2.5, 6.5, 10.5, 14.5],
                                                                [0.4, 0.8, 1.2, 1.6])
    # an odd count keeps the first point alone, so the newest pair merges and the last step stays last
    assert figures.thin(steps[:5], raw[:5], smoothed[:5], max_points=3) == ([1, 3, 5], [1.0, 2.5, 4.5],
                                                                            [0.1, 0.3, 0.5])
    assert figures.thin(steps, raw, smoothed, max_points=20) == (steps, raw, smoothed)


def test_the_ui_and_the_report_module_start_without_matplotlib():
    code = ("import sys, gputwin.faces.app, gputwin.faces.report, gputwin.faces.figures, gputwin.faces.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'tensorboardX')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

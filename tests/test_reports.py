"""Reports rendered from small real inputs: self-contained, escaped, one section per image.

:func:`render_study` (shared with the browser test) writes a derivatives tree the way the
participant level does, with the real MNI template standing in for registered brains and
the real IXI head as the native T1w, then renders both kinds of report.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest

from brainage_bids.bids import collect_t1w, load_layout
from brainage_bids.citation import participant_methods
from brainage_bids.derivatives import derivative_path
from brainage_bids.group.level import build_group
from brainage_bids.reports.render import write_group_report, write_participant_reports
from tests.conftest import read_json as read_card
from tests.test_group import MNI, PEOPLE, XSS, build_study, write_card

FAILURE = "ImageError: sub-03_T1w.nii.gz: cannot be read <b>truncated</b>"
CRASH = "logs/crashes/crash-20261202-sub03-validate.txt"


def render_study(root: Path) -> dict:
    """Two participants: sub-11 with two sessions (ses-2 run with --no-saliency) and sub-03,
    whose image failed; returns the paths of the reports and the images."""
    settings = build_study(root, images={"03", "11"})
    settings = replace(settings, model=str(write_card(root / "card.json")))
    ses2 = {"subject": "11", "session": "2"}
    for desc in ("gradcam", "attention"):
        derivative_path(settings.output_dir, ses2, suffix="saliency", extension=".nii.gz",
                        desc=desc, **MNI).unlink()
    failed = {"subject": "03"}
    derivative_path(settings.output_dir, failed, suffix="brainage", extension=".json").unlink()
    derivative_path(settings.output_dir, failed, suffix="T1w", extension=".nii.gz",
                    desc="preproc", **MNI).unlink()
    images = collect_t1w(load_layout(settings.bids_dir, validate=False),
                         participant_label=("03", "11"))
    failed_node = next(i for i in images if i.subject == "03").node_name
    failures = {failed_node: FAILURE}
    methods = participant_methods(backend="ants", card=read_card(settings.model),
                                  mc_samples=20)
    participant = write_participant_reports(
        settings.output_dir, images, failures,
        crashes={failed_node: str(settings.output_dir / CRASH)}, methods=methods)
    table, sidecar = build_group(settings)
    group = write_group_report(settings.output_dir, table, sidecar, methods=methods,
                               errors=[{"image": "sub-03", "error": FAILURE,
                                        "crash": str(settings.output_dir / CRASH)}])
    return {"settings": settings, "participant": participant, "group": group,
            "images": images}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    return render_study(tmp_path_factory.mktemp("reports"))


class _Assets(HTMLParser):
    """Every URL-valued attribute and every inline element that could load something."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []
        self.imgs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data", "action", "xlink:href"):
                self.urls.append((tag, name, value or ""))
        if tag == "img":
            self.imgs.append(dict(attrs).get("src") or "")


def parse(path: Path) -> _Assets:
    parser = _Assets()
    parser.feed(path.read_text())
    return parser


def assert_self_contained(path: Path) -> _Assets:
    html = path.read_text()
    assets = parse(path)
    for tag, attr, url in assets.urls:
        assert not re.match(r"\s*(https?:)?//", url), f"remote {tag} {attr}: {url[:80]}"
        assert url.startswith(("data:", "#", "sub-", "group_brainage.html")), (tag, attr, url)
    assert assets.imgs and all(src.startswith(("data:image/png;base64,",
                                               "data:image/svg+xml;base64,"))
                               for src in assets.imgs)
    assert "link" not in assets.tags  # no external stylesheet or font
    assert not re.search(r"@import|url\(\s*['\"]?https?:", html)
    assert not re.search(r"<script[^>]+src=", html)
    return assets


def test_participant_reports_one_section_per_image(rendered):
    out = rendered["settings"].output_dir
    assert [p.name for p in rendered["participant"]] == ["sub-03.html", "sub-11.html"]
    html = (out / "sub-11.html").read_text()
    for name in ("sub-11_ses-1", "sub-11_ses-2"):
        assert f'id="{name}"' in html
    assert html.count("Predicted brain age") == 2
    assert "55.0" in html and "± 2.5" in html  # chronological age and the MC-dropout SD
    # the headline gap says it is uncorrected and passes no verdict (regression to the mean)
    assert html.count("Brain-age gap, uncorrected") == 2 and "looks " not in html
    # the caption says what the SD is: these records' uncalibrated single-model spread
    assert html.count("the standard deviation of 20 Monte-Carlo dropout predictions, not "
                      "calibrated") == 2
    assert html.count("<h3>Registration to MNI152NLin6Asym") == 2
    assert html.count("<h3>Brain mask (native space)") == 2
    # ses-2 was run without saliency: one Grad-CAM and one attention figure in all
    assert html.count("<h3>Saliency: Grad-CAM of convolution block") == 1
    assert html.count("<h3>Saliency: shared spatial-attention map") == 1
    figures = sorted(p.name for p in (out / "sub-11" / "figures").iterdir())
    assert figures == sorted([
        "sub-11_ses-1_space-MNI152NLin6Asym_res-2_desc-registration_T1w.png",
        "sub-11_ses-1_desc-brainmask_T1w.png",
        "sub-11_ses-1_space-MNI152NLin6Asym_res-2_desc-gradcam_T1w.png",
        "sub-11_ses-1_space-MNI152NLin6Asym_res-2_desc-gradcamblocks_T1w.png",
        "sub-11_ses-1_space-MNI152NLin6Asym_res-2_desc-attention_T1w.png",
        "sub-11_ses-2_space-MNI152NLin6Asym_res-2_desc-registration_T1w.png",
        "sub-11_ses-2_desc-brainmask_T1w.png"])
    assert all((out / "sub-11" / "figures" / f).read_bytes()[:4] == b"\x89PNG" for f in figures)


def test_reports_are_self_contained(rendered):
    for path in [*rendered["participant"], rendered["group"]]:
        assert_self_contained(path)
    assets = parse(rendered["settings"].output_dir / "sub-11.html")
    assert len(assets.imgs) == 7  # the figures are inline, not links to the PNG files


def test_failed_image_shows_its_error_escaped(rendered):
    html = (rendered["settings"].output_dir / "sub-03.html").read_text()
    assert "cannot be read &lt;b&gt;truncated&lt;/b&gt;" in html
    assert "<b>truncated</b>" not in html
    assert "<h3>Registration to MNI152NLin6Asym" not in html  # its preprocessed brain is gone
    assert "<h3>Brain mask (native space)" in html  # what exists is still shown


def test_group_report_content_and_escaping(rendered):
    html = rendered["group"].read_text()
    assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # only the inline table-sorting script
    assert 'href="sub-11.html"' in html  # relative links to the participant reports
    assert 'href="sub-01.html"' not in html  # no report was written for sub-01
    table = html[html.index('id="group-table"'):html.index('id="errors"')]
    assert ">sub-03<" not in table  # its image failed: no record, no row
    for title in ("Predicted against chronological age", "Brain-age gap against age",
                  "Distribution of the brain-age gap by group"):
        assert title in html
    for label in ("MAE (y)", "r(gap, age)", "Beheshti 2019 (main)", "de Lange &amp; Cole 2020",
                  "Smith 2019"):
        assert label in html
    assert 'class="sortable"' in html
    assert html.count('href="sub-11.html"') == 2  # one row per session
    # years to one decimal, as in the participant reports
    cells = re.findall(r'<td class="num" data-sort="[^"]*">([^<]*)</td>', table)
    assert cells and all(re.fullmatch(r"[+-]?\d+\.\d|n/a", c) for c in cells), cells


def test_participant_report_without_any_record(tmp_path):
    settings = build_study(tmp_path, people=[PEOPLE[0]])
    for path in settings.output_dir.rglob("*_brainage.json"):
        path.unlink()
    images = collect_t1w(load_layout(settings.bids_dir, validate=False))
    (report,) = write_participant_reports(settings.output_dir, images, {})
    html = report.read_text()
    assert "no brain-age record was written" in html
    assert "badge fail" in html


def test_figures_module_leaves_matplotlib_global_state_alone():
    # read the backend without resolving it: matplotlib.get_backend() would import pyplot
    code = ("import matplotlib, sys; raw = lambda: dict.__getitem__(matplotlib.rcParams, "
            "'backend'); before = raw();"
            "import brainage_bids.reports.figures as f, brainage_bids.reports.render;"
            "fig = f.predicted_vs_age([20, 40, 60], [30, 40, 50]);"
            "assert f.figure_bytes(fig, 'svg') == f.figure_bytes(fig, 'svg'), 'svg differs';"
            "f.figure_bytes(fig, 'png');"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported';"
            "assert raw() == before, 'backend changed'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode == 0, result.stderr


def test_group_labels_are_drawn_as_written_not_as_mathtext():
    from brainage_bids.reports import figures as f

    groups = ["$10k-$20k", r"grp $\frac{$", "plain"]
    for fig in (f.predicted_vs_age([20, 40, 60], [30, 40, 50], groups=groups),
                f.gap_distribution({"gap": [1.0, -2.0, 3.0]}, groups=groups)):
        svg = f.figure_bytes(fig, "svg").decode()  # renders: mathtext would raise here
        assert "plain" in svg


def test_reports_do_not_import_the_group_level():
    """render.py and the group level imported each other; the report must stand on its own."""
    code = ("import sys, brainage_bids.reports.render; "
            "sys.exit('brainage_bids.group' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_errors_section_lists_failures_with_their_crash_files(rendered):
    out = rendered["settings"].output_dir
    failed = (out / "sub-03.html").read_text()
    errors = failed[failed.index('id="errors"'):]
    assert "1 image failed" in errors
    assert 'href="#sub-03"' in errors and CRASH in errors  # relative to OUTPUT_DIR
    assert "cannot be read &lt;b&gt;truncated&lt;/b&gt;" in errors
    fine = (out / "sub-11.html").read_text()
    assert "No errors: every image was processed." in fine[fine.index('id="errors"'):]
    group = rendered["group"].read_text()
    errors = group[group.index('id="errors"'):]
    assert "sub-03" in errors and CRASH in errors and "&lt;b&gt;truncated" in errors


def test_methods_section_in_both_reports(rendered):
    out = rendered["settings"].output_dir
    for html in ((out / "sub-11.html").read_text(), rendered["group"].read_text()):
        methods = html[html.index('id="methods"'):]
        assert "Brain age was predicted with the model" in methods
        assert "Kancharla &amp; Sinha, 2024" in methods and "<ol class=\"references\">" in methods

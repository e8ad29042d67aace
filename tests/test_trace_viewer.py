"""The trace viewer (asft.tracing.viewer): a page that hostile token text cannot break, and that really works.

The unit tests read the HTML string: the embedded JSON round-trips and no token can end its <script> element.
The browser tests open the written file in headless Chromium (Playwright, file://, no server) and use the page as
a reader would: sort, filter, hover colours, a screenshot. Without Chromium or Playwright they skip, unless
ASFT_REQUIRE_BROWSER=1 (CI), where a missing browser is a failure rather than a silent pass.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asft.tracing.viewer import embed_json, render_viewer, write_viewer

CHROMIUM = os.environ.get("ASFT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WEIGHTS = ["dft", "topk", "antiop", "ref_ratio"]
CLASSES = ["number", "operator", "word", "format", "other"]
# each would escape a naively embedded page: end the script, open a comment, run code, or break a JS string
HOSTILE = [
    '</script><script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">',
    "<!--<script>",
    "&amp; \"quotes\" 'single' \u2028line\u2029para",
]
DATA_SCRIPT = re.compile(r'<script type="application/json" id="trace-data">(.*?)</script>', re.S)


def _target(index: int, text: str, alignment: float | None, cls: str, magnitude: float | None = 1.0) -> dict[str, Any]:
    return {
        "text": text,
        "target": True,
        "index": index,
        "alignment": alignment,
        "magnitude": magnitude,
        "ce": 0.1 + 0.05 * index,
        "class": cls,
        "weights": {"dft": 0.5, "topk": 1.0 + index / 10, "antiop": 1.0, "ref_ratio": None if index % 3 else 0.8},
    }


def _prompt(text: str) -> dict[str, Any]:
    return {"text": text, "target": False}


def make_view() -> dict[str, Any]:
    """Three sequences with every case the page must handle: ±alignments, a zero gradient (null), newline and
    whitespace tokens, the hostile texts, and target indices that are not in page order."""
    seq0 = [_prompt("What"), _prompt(" is"), _prompt(" 12"), _prompt("+"), _prompt("30"), _prompt("?"), _prompt("\n")]
    seq0 += [
        _target(0, " 12", 0.8, "number"),
        _target(1, " +", -0.6, "operator"),
        _target(2, " 30", 0.05, "number"),
        _target(3, " =", None, "operator", magnitude=None),
        _target(4, "\n", -0.2, "format"),
        _target(5, " 42", -0.9, "number"),
        _target(6, ".", 0.3, "format"),
    ]
    seq1 = [_prompt("Say"), _prompt(" it"), _prompt(":"), _prompt("  ")]
    seq1 += [
        _target(11, HOSTILE[0], 0.4, "other"),
        _target(9, HOSTILE[1], -0.3, "other"),
        _target(10, HOSTILE[2], 0.1, "word"),
        _target(7, " yes", 0.55, "word"),
        _target(8, " ", -0.05, "format"),
    ]
    seq2 = [_prompt("Count"), _prompt(":")]
    seq2 += [_target(12 + i, f" {i}", math.sin(i) * 0.7, "number") for i in range(6)]
    return {
        "title": "asft · tiny · arith · seed 0 <b>not bold</b>",
        "subtitle": "LoRA A/B, 37,888 parameters, projected to d=256 (seed 0)",
        "metrics": [["Gini of magnitudes", "0.515"], ["Tokens for 80% of the weight", "42.5%"], [HOSTILE[1], "&"]],
        "classes": CLASSES,
        "weight_names": WEIGHTS,
        "sequences": [
            {"id": "b0/r1", "batch": 0, "row": 1, "example_id": 17, "tokens": seq0},
            {"id": "b0/r2", "batch": 0, "row": 2, "example_id": 3, "tokens": seq1},
            {"id": "b1/r0", "batch": 1, "row": 0, "tokens": seq2},
        ],
    }


def targets_of(view: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for seq in view["sequences"] for t in seq["tokens"] if t["target"]]


def embedded(page: str) -> Any:
    (payload,) = DATA_SCRIPT.findall(page)
    return json.loads(payload)


# ---- the HTML string ----


def test_embedded_json_round_trips() -> None:
    view = make_view()
    page = render_viewer(view)
    assert embedded(page) == view
    assert page.startswith("<!DOCTYPE html>")


def test_hostile_text_stays_inside_the_json() -> None:
    page = render_viewer(make_view())
    # exactly the page's own two scripts: the data block ends where it should, nothing else opens one
    assert page.lower().count("<script") == 2
    assert page.lower().count("</script") == 2
    assert "<!--" not in page
    assert "<img" not in page.lower() and "<b>" not in page
    assert "\u2028" not in page and "\u2029" not in page
    (payload,) = DATA_SCRIPT.findall(page)
    assert not set("<>&") & set(payload)
    # the page's own code never parses token text as HTML
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page
    # the title is escaped text in <title>
    assert "<title>asft · tiny · arith · seed 0 &lt;b&gt;not bold&lt;/b&gt;</title>" in page


def test_nulls_numpy_and_non_finite_values_embed_as_json() -> None:
    view = make_view()
    token = view["sequences"][0]["tokens"][-1]
    token.update(alignment=np.float32(0.25), magnitude=float("nan"), ce=np.float64(np.inf), index=np.int64(6))
    token["weights"]["dft"] = np.float64(-np.inf)
    data = embedded(render_viewer(view))
    out = data["sequences"][0]["tokens"][-1]
    assert out["alignment"] == 0.25 and out["index"] == 6
    assert out["magnitude"] is None and out["ce"] is None and out["weights"]["dft"] is None
    assert data["sequences"][0]["tokens"][10]["alignment"] is None  # the zero-gradient token stays null
    assert json.loads(embed_json({"x": "</script>"})) == {"x": "</script>"}


def test_defaults_and_malformed_views() -> None:
    data = embedded(render_viewer({"sequences": []}))
    assert data["classes"] == CLASSES and data["weight_names"] == [] and data["metrics"] == []
    with pytest.raises(ValueError, match="sequences"):
        render_viewer({"title": "x"})
    view = make_view()
    view["sequences"][2]["tokens"][-1]["index"] = 0
    with pytest.raises(ValueError, match="appears twice"):
        render_viewer(view)
    view = make_view()
    del view["sequences"][0]["tokens"][-1]["index"]
    with pytest.raises(ValueError, match="integer index"):
        render_viewer(view)
    with pytest.raises(TypeError, match="cannot embed"):
        embed_json({"x": object()})


def test_write_viewer_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "out" / "viewer.html"
    assert write_viewer({"sequences": []}, path) == path
    assert write_viewer(make_view(), path) == path
    assert embedded(path.read_text(encoding="utf-8")) == make_view()
    assert sorted(p.name for p in path.parent.iterdir()) == ["viewer.html"]  # no temp file left


# ---- the page in a real browser ----


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium, or a skip (a failure under ASFT_REQUIRE_BROWSER=1) where it cannot run here."""
    reason = None
    if not Path(CHROMIUM).exists():
        reason = f"no Chromium at {CHROMIUM} (set ASFT_CHROMIUM to another binary)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the playwright package is not installed"
    if reason:
        if os.environ.get("ASFT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"ASFT_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Opened:
    """A page with the viewer loaded from file://, collecting every console error and uncaught exception."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_selector("body[data-ready='1']", timeout=10_000)

    def column(self, key: str, visible_only: bool = True) -> list[str]:
        """The text of column `key` in every (visible) table row, in display order."""
        return self.page.evaluate(
            """([key, visibleOnly]) => {
                const ths = [...document.querySelectorAll('#token-table thead th')];
                const col = ths.findIndex(th => th.dataset.key === key);
                return [...document.querySelectorAll('#token-table tbody tr')]
                    .filter(tr => !visibleOnly || tr.offsetParent !== null).map(tr => tr.cells[col].textContent);
            }""",
            [key, visible_only],
        )

    def rgb(self, selector: str) -> tuple[int, ...]:
        colour = self.page.eval_on_selector(selector, "e => getComputedStyle(e).backgroundColor")
        return tuple(int(x) for x in re.findall(r"\d+", colour)[:3])


@pytest.fixture
def viewer(browser: Any, tmp_path: Path) -> Iterator[Opened]:
    opened = Opened(browser, write_viewer(make_view(), tmp_path / "viewer.html"))
    yield opened
    assert opened.errors == []
    opened.page.close()


def _numbers(cells: list[str]) -> list[float | None]:
    return [None if c == "\u2013" else float(c) for c in cells]


def test_page_renders_every_token_and_hostile_text_literally(viewer: Opened) -> None:
    page, view = viewer.page, make_view()
    targets = targets_of(view)
    assert viewer.errors == []
    assert page.title() == view["title"]
    assert page.text_content("#title") == view["title"]
    assert page.locator("#metrics tr").count() == 3
    assert page.locator("#metrics th").nth(2).text_content() == HOSTILE[1]
    rows = page.locator("#token-table tbody tr")
    assert rows.count() == len(targets)
    assert page.eval_on_selector_all("#token-table tbody tr", "rs => rs.map(r => +r.dataset.index)") == [
        t["index"] for t in targets
    ]
    assert page.locator("#text-panel span.tok").count() == sum(len(s["tokens"]) for s in view["sequences"])
    assert page.locator("#text-panel span.tok.prompt").count() == sum(
        len(s["tokens"]) for s in view["sequences"]
    ) - len(targets)
    # hostile texts show literally, in the text panel and the table, and nothing they contain ran or exists
    for index, text in ((11, HOSTILE[0]), (9, HOSTILE[1]), (10, HOSTILE[2])):
        assert page.text_content(f"span.tok[data-index='{index}']") == text
        assert page.text_content(f"#token-table tr[data-index='{index}'] td.text") == text
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img, iframe, b").count() == 0
    assert page.locator("script").count() == 2
    # a newline token breaks the line and shows ↵; a whitespace-only token shows ␣; the tooltip has the statistics
    assert page.text_content("span.tok[data-index='4']") == "\u21b5\n"
    assert page.text_content("span.tok[data-index='8']") == "\u2423"
    tip = page.get_attribute("span.tok[data-index='1']", "title")
    assert all(s in tip for s in ("operator", "alignment -0.600", "magnitude 1.000", "CE 0.150", "topk 1.100"))
    assert "zero gradient" in page.get_attribute("span.tok[data-index='3']", "title")
    assert page.get_attribute("span.tok[data-index='3']", "data-alignment") == ""
    assert page.get_attribute("span.tok[data-index='0']", "data-alignment") == "0.8"


def test_sorting_by_a_header_and_reversing(viewer: Opened) -> None:
    page = viewer.page
    expected = sorted(t["alignment"] for t in targets_of(make_view()) if t["alignment"] is not None)
    page.click("th[data-key='alignment']")
    values = _numbers(viewer.column("alignment"))
    assert values[-1] is None  # the zero-gradient token last
    assert values[:-1] == pytest.approx(expected, abs=5e-4)
    assert page.get_attribute("th[data-key='alignment']", "aria-sort") == "ascending"
    page.click("th[data-key='alignment']")
    values = _numbers(viewer.column("alignment"))
    assert values[-1] is None  # nulls last in both directions
    assert values[:-1] == pytest.approx(expected[::-1], abs=5e-4)
    assert page.get_attribute("th[data-key='alignment']", "aria-sort") == "descending"
    # a weight column with nulls, then the index column (numeric, not lexicographic: 2 < 10)
    page.click("th[data-key='weight_ref_ratio']")
    ratios = _numbers(viewer.column("weight_ref_ratio"))
    assert ratios[: ratios.index(None)] == [0.8] * 6 and set(ratios[ratios.index(None) :]) == {None}
    page.click("th[data-key='index']")
    assert [int(x) for x in viewer.column("index")] == list(range(18))
    assert page.get_attribute("th[data-key='alignment']", "aria-sort") is None


def test_class_filter_hides_rows_and_dims_tokens(viewer: Opened) -> None:
    page, targets = viewer.page, targets_of(make_view())
    numbers = [t["index"] for t in targets if t["class"] == "number"]
    page.uncheck("input.class-filter[value='number']")
    visible = [int(i) for i in viewer.column("index")]
    assert len(visible) == len(targets) - len(numbers) and not set(visible) & set(numbers)
    assert page.locator("#token-table tbody tr[data-class='number']:visible").count() == 0
    opacity = "e => +getComputedStyle(e).opacity"
    assert page.eval_on_selector(f"span.tok[data-index='{numbers[0]}']", opacity) < 0.5
    assert page.eval_on_selector("span.tok[data-index='1']", opacity) == 1  # an operator stays
    assert page.eval_on_selector("#text-panel span.tok.prompt", opacity) == 1
    page.check("input.class-filter[value='number']")
    assert len(viewer.column("index")) == len(targets)
    assert page.eval_on_selector(f"span.tok[data-index='{numbers[0]}']", opacity) == 1
    # one sequence: only its rows and its text
    page.select_option("#sequence-filter", "b0/r2")
    assert sorted(int(i) for i in viewer.column("index")) == [7, 8, 9, 10, 11]
    assert page.locator("section.seq:visible").count() == 1
    assert page.locator("span.tok[data-index='0']").is_visible() is False


def test_alignment_colours(viewer: Opened) -> None:
    page = viewer.page
    r, g, b = viewer.rgb("span.tok[data-index='0']")  # +0.8
    assert b > r + 100 and b > g
    r, g, b = viewer.rgb("span.tok[data-index='5']")  # -0.9
    assert r > b + 100 and r > g
    r, g, b = viewer.rgb("span.tok[data-index='2']")  # +0.05: nearly white
    assert min(r, g, b) > 235
    r, g, b = viewer.rgb("span.tok[data-index='3']")  # zero gradient: grey
    assert max(r, g, b) - min(r, g, b) < 25 and max(r, g, b) < 230
    prompt = viewer.page.eval_on_selector("#text-panel span.tok.prompt", "e => getComputedStyle(e).backgroundColor")
    assert prompt == "rgba(0, 0, 0, 0)"  # no colour on context
    assert viewer.rgb("#token-table tr[data-index='5'] td:nth-child(5)")[0] > 150  # the table's alignment cell too
    # stretching the range to max|a| = 0.9 makes a small alignment clearly blue
    before = viewer.rgb("span.tok[data-index='2']")
    page.select_option("#colour-range", "auto")
    after = viewer.rgb("span.tok[data-index='2']")
    assert after[0] < before[0] and after[2] >= after[0]
    assert page.text_content("#legend-pos") == "+0.900 aligned"
    page.click("span.tok[data-index='5']")
    assert page.get_attribute("#token-table tr[data-index='5']", "class") == "selected"


def test_screenshot_is_a_real_picture(viewer: Opened, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "viewer.png"
    viewer.page.screenshot(path=str(shot))
    assert shot.stat().st_size > 20_000
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (900, 1280)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 200
    r, g, b = (image[..., i].astype(int) for i in range(3))
    assert ((b - r > 80) & (b > 120)).sum() > 100  # blue (aligned) tokens painted
    assert ((r - b > 80) & (r > 120)).sum() > 100  # red (opposing) tokens painted
    if os.environ.get("ASFT_VIEWER_SHOT"):  # keep a copy to look at
        Path(os.environ["ASFT_VIEWER_SHOT"]).write_bytes(shot.read_bytes())


def test_a_7b_sized_trace_is_paged(browser: Any, tmp_path: Path) -> None:
    """A 7B-sized trace (8 sequences × 2048 tokens, 14k targets) builds, sorts, filters and pages with one page of
    table rows in the DOM (a whole table of that size is too slow to relayout; the speed itself is not asserted:
    a shared CI machine's timings prove nothing)."""
    rng = np.random.default_rng(0)
    sequences, index = [], 0
    for s in range(8):
        tokens = [_prompt(f" p{i}") for i in range(256)]
        for _ in range(2048 - 256):
            a = float(np.clip(rng.normal(0.05, 0.2), -1, 1))
            tokens.append(_target(index, f" t{index}", a, CLASSES[index % 5], magnitude=float(rng.gamma(2.0))))
            index += 1
        sequences.append({"id": f"b{s // 4}/r{s % 4}", "batch": s // 4, "row": s % 4, "tokens": tokens})
    view = {"title": "big", "classes": CLASSES, "weight_names": WEIGHTS, "sequences": sequences}
    opened = Opened(browser, write_viewer(view, tmp_path / "big.html"))
    page = opened.page
    assert page.locator("span.tok.target").count() == index
    assert page.locator("#token-table tbody tr").count() == 250  # one page of rows in the DOM
    assert page.text_content("#row-count").startswith(f"1\u2013250 of {index} shown")
    page.click("th[data-key='magnitude']")
    page.uncheck("input.class-filter[value='word']")
    mags = np.array([t["magnitude"] for s in sequences for t in s["tokens"] if t["target"]])
    kept = np.array([CLASSES[i % 5] != "word" for i in range(index)])
    order = np.flatnonzero(kept)[np.argsort(mags[kept], kind="stable")]
    assert [int(i) for i in opened.column("index")] == order[:250].tolist()
    page.click("#page-next")
    assert [int(i) for i in opened.column("index")] == order[250:500].tolist()
    # clicking a token turns the table to its row's page
    far = int(order[-1])
    page.click(f"span.tok[data-index='{far}']")
    assert page.get_attribute(f"#token-table tr[data-index='{far}']", "class") == "selected"
    assert opened.errors == []
    page.close()

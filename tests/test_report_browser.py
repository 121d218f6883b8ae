"""The report in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

It opens a report of synthetic records (passes, failures two of which start in the same place,
an error, a skip) and checks what a reviewer sees: no console errors, the grid's cells, the
failure summary's rows, filters that hide what they should, expand / collapse all; a screenshot
goes to pytest's tmp dir, or to ``$PARITY_SCREENSHOTS``. A 200-case report must open (load event)
in under 2 seconds.

Without Chromium or Playwright the tests skip with the reason, except in CI (``CI=true``), where
they fail: a browser test that skips there checks nothing (``.ci/run`` installs Chromium).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reports import render_index

from report_data import ACCURACY, ENV, HISTORY, RUN, many_records, review_records

CHROMIUM = os.environ.get("PARITY_CHROMIUM", "/usr/bin/chromium")
# Offline and as root: no sandbox, and none of Chromium's background connections (on a machine
# without a network they fail, many at a time, and slow the start).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# A 200-case report must open within this (load event, measured by the browser's navigation timing).
OPEN_LIMIT_MS = 2000.0


def missing() -> str:
    """Why the browser cannot run here ("" when it can)."""
    reasons = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reasons.append("playwright is not installed (pip install playwright: the dev extra)")
    if not os.access(CHROMIUM, os.X_OK):
        reasons.append(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    return "; ".join(reasons)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test cannot run in CI: {reason}", pytrace=False)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[tuple[Any, list[str]]]:
    """A fresh page and the console errors (and uncaught exceptions) it reports."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page, errors
    page.close()


def screenshots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("PARITY_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def screenshot(page: Any, index: Path, png: Path, full_page: bool = True) -> None:
    """Open ``index`` and save it as ``png`` (how docs/report-*.png are made)."""
    page.goto(index.resolve().as_uri(), wait_until="load")
    page.screenshot(path=str(png), full_page=full_page)


def visible(page: Any, selector: str) -> list[bool]:
    loc = page.locator(selector)
    return [loc.nth(i).is_visible() for i in range(loc.count())]


def test_review_report_in_chromium(page: tuple[Any, list[str]], tmp_path: Path) -> None:
    tab, errors = page
    index = render_index(tmp_path / "report", review_records(), ENV, run=RUN, history=HISTORY, accuracy=ACCURACY)
    tab.goto(index.as_uri(), wait_until="load")
    assert errors == []
    assert tab.title().startswith("FAIL — ")
    assert tab.locator("table.grid td").count() == 5 * 3  # setups x scenarios, one cell each
    assert tab.locator("table.grid a.pill").count() == 10  # every case, two in one cell
    assert tab.locator("table.summary tr.f").count() == 4  # three failures and the error
    assert tab.locator("section.group").count() == 2
    # The two cases of one cell sit in one column: every row has as many cells as the header.
    widths = tab.evaluate("Array.from(document.querySelectorAll('table.grid tr')).map(r => r.children.length)")
    assert set(widths) == {4}
    tab.screenshot(path=str(screenshots(tmp_path) / "report-review.png"), full_page=True)

    tab.uncheck("input.fstatus[value=pass]")
    assert not any(visible(tab, "a.pill.pass")) and not any(visible(tab, "details.case.pass"))
    assert all(visible(tab, "a.pill.fail")) and all(visible(tab, "table.summary tr.f"))
    tab.check("input.fstatus[value=pass]")
    assert all(visible(tab, "a.pill.pass"))

    tab.select_option("#fsetup", "tp2-pp2-sp-graph-full")
    assert visible(tab, "table.grid tr.f") == [False, False, True, False, False]
    assert visible(tab, "section.group") == [False, True]
    assert visible(tab, "table.summary tr.f") == [False, False, True, False]
    tab.select_option("#fsetup", "")
    tab.select_option("#fscenario", "mixed")
    assert visible(tab, "section.group") == [True, False]  # the shared group holds a mixed case
    assert sum(visible(tab, "details.case.fail")) == 1
    tab.select_option("#fscenario", "")

    tab.click("#collapse")
    assert tab.evaluate("Array.from(document.querySelectorAll('details.case')).some(d => d.open)") is False
    tab.click("#expand")
    assert tab.evaluate("Array.from(document.querySelectorAll('details.case')).every(d => d.open)") is True
    # A grid link opens its case even when it starts collapsed.
    tab.click("#collapse")
    tab.click("table.grid a.pill.pass >> nth=0")
    tab.wait_for_function("document.querySelector('details.case.pass').open", timeout=5000)
    assert errors == []


def test_200_case_report_opens_in_under_2_seconds(page: tuple[Any, list[str]], tmp_path: Path) -> None:
    tab, errors = page
    index = render_index(tmp_path / "big", many_records(200), ENV, run=RUN)
    tab.goto(index.as_uri(), wait_until="load")
    load_ms = tab.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
    print(f"200-case report ({index.stat().st_size / 1e6:.1f} MB): load event after {load_ms:.0f} ms")
    assert errors == []
    assert tab.locator("table.grid a.pill").count() == 200
    assert 0 < load_ms < OPEN_LIMIT_MS

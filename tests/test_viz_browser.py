"""The map page in a real headless Chromium: it loads, points render, a click shows the right
conversation (roles rendered, text escaped), the legend lists cluster sizes, a dropped JSON opens."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ochat.cli import main

TARGET = 17
EVIL = "<img src=x onerror=\"window.pwned=1\"> & </script><b>not bold</b>"


def _map_data() -> dict:
    """40 points in 3 clusters; point TARGET sits at the centre of the cube, where the view is centred,
    and no other point is near the camera's line of sight through it."""
    rng = np.random.default_rng(1)
    pts = [np.array([-1.0, -1.0, 1.0]), np.array([1.0, 1.0, -1.0])]   # the bounding box is [-1, 1]^3
    while len(pts) < 39:
        p = rng.uniform(-1, 1, 3)
        if np.linalg.norm(p - p.mean()) > 0.5:          # away from the line x = y = z (the default camera's view)
            pts.append(p)
    pts.insert(TARGET, np.zeros(3))
    pts = np.array(pts)
    convs, texts = [], []
    for i in range(40):
        items = [{"role": "user", "content": f"Question number {i}?", "weight": 0.0},
                 {"role": "assistant", "content": f"Answer number {i}.", "weight": 1.0}]
        if i == TARGET:
            items = [{"role": "user", "content": "What is the capital of France?", "weight": 0.0},
                     {"role": "assistant", "content": "Paris. " + EVIL, "weight": 1.0}]
        convs.append({"items": items, "condition": "GPT4 Correct", "system": ""})
        texts.append("".join(f"GPT4 Correct {m['role'].title()}: {m['content']}<|end_of_turn|>" for m in items))
    color = [0 if i < 20 else 1 if i < 32 else 2 for i in range(40)]
    return {"text": texts, "embedding": pts.round(4).tolist(), "color": color, "conversation": convs,
            "id": [f"c{i}" for i in range(40)], "cluster_names": ["geography, capitals", "numbers", "more numbers"]}


def _open(browser, path: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:") else route.continue_())
    page.goto(path.as_uri())
    page.wait_for_function("window.ochatViz && window.ochatViz.data && document.querySelector('#plot canvas')")
    return page, errors


def test_page_loads_renders_and_click_shows_the_conversation(browser, tmp_path, shared_data):
    src = tmp_path / "demo.visualizer.json"
    src.write_text(json.dumps(_map_data()))
    html = tmp_path / "demo.html"
    assert main(["viz", "html", "--in", str(src), "--out", str(html)]) == 0
    page, errors = _open(browser, html)   # every non-file request is aborted: the page is self-contained

    # points render: three WebGL traces holding all 40 points
    sizes = page.evaluate("document.getElementById('plot')._fullData.map(t => t.x.length)")
    assert sizes == [20, 12, 8, 0]                 # three clusters, and the ring of the selected point
    assert page.locator("#summary").inner_text().startswith("40 conversations · 3 clusters")
    legend = page.locator("#legend .item")
    assert legend.count() == 3
    assert legend.nth(0).inner_text().split() == ["0", "·", "geography,", "capitals", "20"]
    assert legend.nth(2).locator(".size").inner_text() == "8"

    # click the point in the middle of the plot with the mouse: it is conversation TARGET
    box = page.locator("#plot").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector(".hovertext", timeout=10_000)
    assert "capital of France" in page.locator(".hovertext").text_content()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, delay=150)  # a human-length press
    page.wait_for_function(f"window.ochatViz.selected === {TARGET}", timeout=10_000)
    msgs = page.locator("#reader .msg")
    assert msgs.count() == 2
    assert msgs.nth(0).locator(".role").text_content().startswith("User")
    assert msgs.nth(0).locator(".content").inner_text() == "What is the capital of France?"
    assert msgs.nth(1).locator(".role").text_content().startswith("Assistant")
    assert msgs.nth(1).locator(".content").inner_text() == "Paris. " + EVIL      # shown as text, not as HTML
    assert page.locator("#reader img, #reader b").count() == 0 and not page.evaluate("window.pwned")
    assert f"id c{TARGET}" in page.locator("#reader .meta").inner_text()
    page.wait_for_function("document.getElementById('plot')._fullData[3].x.length === 1")   # the ring is on it
    assert page.evaluate("document.getElementById('plot')._fullData[3].x") == [0]
    shot = Path(os.environ.get("OCHAT_SCREENSHOTS", tmp_path)) / "viz_map.png"
    page.screenshot(path=str(shot))
    print(f"screenshot: {shot}")

    # hide a cluster from the legend
    legend.nth(1).click()
    assert page.evaluate("document.getElementById('plot')._fullData[1].visible") is False

    # drop OpenChat's own example file onto the page: it replaces the map; its text-only turns are split by role
    example = (shared_data / "openchat_v1" / "example.visualizer.json").read_text()
    dt = page.evaluate_handle("""(text) => { const dt = new DataTransfer();
        dt.items.add(new File([text], 'example.visualizer.json', {type: 'application/json'})); return dt; }""", example)
    page.dispatch_event("body", "drop", {"dataTransfer": dt})
    page.wait_for_function("window.ochatViz.data.text.length === 2")
    assert page.locator("#title").inner_text() == "example"
    assert page.locator("#legend .item").count() == 2
    page.evaluate("document.getElementById('plot').emit('plotly_click', {points: [{customdata: 1}]})")
    msgs = page.locator("#reader .msg")
    assert [msgs.nth(i).locator(".content").inner_text() for i in range(msgs.count())] == ["Who are you?", "I am GPT-4."]
    assert msgs.nth(0).locator(".role").text_content().startswith("Human")

    # a dropped file that is not a visualizer JSON: an error on the page, the map stays
    dt = page.evaluate_handle("""() => { const dt = new DataTransfer();
        dt.items.add(new File(['{"text": ["a"]}'], 'bad.json')); return dt; }""")
    page.dispatch_event("body", "drop", {"dataTransfer": dt})
    page.wait_for_selector("#error", state="visible")
    assert "bad.json: field 'embedding'" in page.locator("#error").inner_text()
    assert page.evaluate("window.ochatViz.data.text.length") == 2
    assert errors == []
    page.close()

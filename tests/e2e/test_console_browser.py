"""The graph console in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by Selenium, against a gateway with fake workers and the default
graph. Skipped, saying why, where the browser or Selenium is not installed
(scripts/browser-tools.sh installs the browser, the `dev` extra installs Selenium).

The screenshot lands in test-artifacts/console.png; with OCTOGRAPH_UPDATE_SCREENSHOT=1 it also
replaces docs/console.png, the one the README shows."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.graph.functional_tokens import assign_tokens, token_name
from service.graph.schema import RouterNode, parse_graph
from tests.e2e.console_stack import CONSOLE_GRAPH, ThreadedStack
from tests.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
DOCS_SCREENSHOT = REPO / "docs" / "console.png"
CHROMIUM = os.environ.get("OCTOGRAPH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = (
    os.environ.get("OCTOGRAPH_CHROMEDRIVER")
    or shutil.which("chromedriver")
    or "/usr/bin/chromedriver"
)
WIDTH, HEIGHT = 1280, 800

pytestmark = pytest.mark.timeout(180)

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # pragma: no cover - depends on the machine
    webdriver = None


def _missing() -> str | None:
    if webdriver is None:
        return "selenium is not installed (pip install selenium)"
    for path, package in ((CHROMIUM, "chromium"), (DRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return (
                f"{path} not found: run scripts/browser-tools.sh "
                f"(apt-get install --no-install-recommends {package})"
            )
    return None


def set_viewport(driver: Any, height: int) -> None:
    """The page's own viewport, WIDTH x height (--window-size counts the window, not the page)."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


@pytest.fixture
def browser() -> Iterator[Any]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a driver
    profile = tempfile.mkdtemp(prefix="octograph-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    set_viewport(driver, HEIGHT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def stack() -> Iterator[ThreadedStack]:
    if _missing():
        pytest.skip(_missing() or "")
    s = ThreadedStack().start()
    yield s
    s.stop()


def wait(driver: Any, condition: Any, timeout: float = 15.0) -> Any:
    # The console re-renders on every event: an element read mid-render goes stale; retry.
    from selenium.common.exceptions import StaleElementReferenceException

    return WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    ).until(condition)


def classes(el: Any) -> set[str]:
    return set((el.get_attribute("class") or "").split())


def node_el(driver: Any, node: str) -> Any:
    return driver.find_element(By.CSS_SELECTOR, f'#graph .node[data-node="{node}"]')


def test_console_draws_the_graph_routes_a_prompt_and_streams_the_answer(
    stack: ThreadedStack, browser: Any
) -> None:
    graph = parse_graph(CONSOLE_GRAPH)
    # Some earlier traffic (clients other than the page): math, code, science > chemistry.
    for prompt in ("the integral of x^2", "python sort a dict", "a molecule of water"):
        chat = {"model": "auto", "messages": [{"role": "user", "content": prompt}]}
        assert (
            httpx.post(
                stack.url + "/v1/chat/completions", json=chat, timeout=30, trust_env=False
            ).status_code
            == 200
        )
    browser.get(stack.url + "/console")
    wait(
        browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#graph .node")) == len(graph.nodes)
    )

    # Every node is drawn once, as its kind, healthy, with its live counters.
    drawn = {
        el.get_attribute("data-node"): el
        for el in browser.find_elements(By.CSS_SELECTOR, "#graph .node")
    }
    assert set(drawn) == set(graph.nodes)
    for nid, node in graph.nodes.items():
        assert drawn[nid].get_attribute("data-kind") == node.kind
    wait(
        browser,
        lambda d: all(node_el(d, n).get_attribute("data-health") == "healthy" for n in graph.nodes),
    )
    wait(
        browser,
        lambda d: "/min" in node_el(d, "math").find_element(By.CSS_SELECTOR, "text.counters").text,
    )
    # No shared state: the page says its counters are this replica's.
    scope = browser.find_element(By.ID, "scope")
    assert (scope.text, scope.get_attribute("data-scope")) == ("this replica", "this replica")
    # Each router edge carries its child's functional token.
    tokens = assign_tokens(graph)
    for rid, router in graph.nodes.items():
        if not isinstance(router, RouterNode):
            continue
        for child in router.children:
            edge = browser.find_element(
                By.CSS_SELECTOR, f'#graph .edge[data-from="{rid}"][data-to="{child}"] text.token'
            )
            assert edge.text == token_name(tokens[child])
    # No two boxes overlap (the layout of the 13-node graph at 1280x800).
    boxes = [el.find_element(By.CSS_SELECTOR, "rect.box").rect for el in drawn.values()]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["width"] <= b["x"]
                or b["x"] + b["width"] <= a["x"]
                or a["y"] + a["height"] <= b["y"]
                or b["y"] + b["height"] <= a["y"]
            )
            assert apart, (a, b)

    # The playground: `auto` routes root > science > physics (the fake router is steered by
    # the word "quantum"), the route lights up with its scores, the answer streams in.
    Select(browser.find_element(By.ID, "target")).select_by_value("auto")
    browser.find_element(By.ID, "prompt").send_keys("What is a quantum of light?")
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda d: "on-route" in classes(node_el(d, "physics")))
    # Streaming: text arrives before the stream is done (fake tokens come every 40 ms).
    wait(browser, lambda d: d.find_element(By.ID, "answer").text.startswith("fake answer"))
    assert browser.find_element(By.ID, "answer").get_attribute("data-done") != "1"
    wait(browser, lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "1")

    on_route = {n for n, el in drawn.items() if "on-route" in classes(node_el(browser, n))}
    assert on_route == {"root", "science", "physics"}
    assert "route-target" in classes(node_el(browser, "physics"))
    for a, b in (("root", "science"), ("science", "physics")):
        edge = browser.find_element(
            By.CSS_SELECTOR, f'#graph .edge[data-from="{a}"][data-to="{b}"]'
        )
        assert "on-route" in classes(edge)
        score = edge.find_element(By.CSS_SELECTOR, "text.score").text
        assert score.endswith("%") and float(score[:-1]) > 50
    assert "on-route" not in classes(
        browser.find_element(By.CSS_SELECTOR, '#graph .edge[data-from="root"][data-to="math"]')
    )
    answer = browser.find_element(By.ID, "answer").text
    assert answer.startswith("fake answer 0 about light?") and answer.endswith("w18")
    chips = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#route-chips .chip")]
    assert chips == ["root", "science", "physics"]
    hop_rows = browser.find_elements(By.CSS_SELECTOR, "#hops .bar-row.chosen .label")
    assert [r.text for r in hop_rows] == ["science", "physics"]

    # Recent decisions and the counters follow (the page refreshes every few seconds).
    wait(
        browser,
        lambda d: d.find_elements(
            By.CSS_SELECTOR, '#decisions tbody tr[data-route="root>science>physics"]'
        ),
    )
    wait(
        browser,
        lambda d: (
            node_el(d, "physics")
            .find_element(By.CSS_SELECTOR, "text.counters")
            .text.startswith("1/min")
        ),
    )
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#decisions tbody tr")) == 4)
    assert (
        node_el(browser, "root")
        .find_element(By.CSS_SELECTOR, "text.counters")
        .text.startswith("4/min")
    )
    # Filtering by a node keeps the decisions through it; by one no route took, none.
    rows = lambda d: [  # noqa: E731
        r.get_attribute("data-route")  # noqa: E731
        for r in d.find_elements(By.CSS_SELECTOR, "#decisions tbody tr")
    ]
    Select(browser.find_element(By.ID, "dec-filter")).select_by_value("science")
    assert rows(browser) == ["root>science>physics", "root>science>chemistry"]  # newest first
    Select(browser.find_element(By.ID, "dec-filter")).select_by_value("law")
    assert rows(browser) == []
    assert "law" in browser.find_element(By.ID, "dec-empty").text
    node_el(browser, "code").click()  # a click on a node filters too
    wait(browser, lambda d: rows(d) == ["root>code"])
    assert browser.find_element(By.ID, "dec-filter").get_attribute("value") == "code"
    node_el(browser, "code").click()  # and a second click clears it
    wait(browser, lambda d: len(rows(d)) == 4)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "console.png"
    # The whole page (the hop scores sit below the fold at 800 px), then back to the viewport.
    full = browser.execute_script("return document.documentElement.scrollHeight")
    set_viewport(browser, HEIGHT if full is None else max(HEIGHT, int(full)))
    assert browser.save_screenshot(str(shot))
    set_viewport(browser, HEIGHT)
    assert shot.stat().st_size > 10_000  # a page, not a blank frame
    if os.environ.get("OCTOGRAPH_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.write_bytes(shot.read_bytes())

    # A node picked by id: no routing, only that node lights up.
    Select(browser.find_element(By.ID, "target")).select_by_value("code")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("reverse a list in python")
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "1")
    assert {n for n in drawn if "on-route" in classes(node_el(browser, n))} == {"code"}
    assert browser.find_element(By.ID, "answer").text.startswith("fake answer 0 about python")
    assert browser.find_element(By.ID, "hops-box").get_attribute("hidden") is not None

    logs = [
        e
        for e in browser.get_log("browser")
        if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]
    ]
    assert not logs, logs


def test_console_asks_for_the_api_key(browser: Any) -> None:
    s = ThreadedStack(settings_kw={"api_keys": ["console-key"]}).start()
    try:
        browser.get(s.url + "/console")
        dialog = wait(
            browser,
            lambda d: (
                d.find_element(By.ID, "key-dialog").is_displayed()
                and d.find_element(By.ID, "key-dialog")
            ),
        )
        assert browser.find_element(By.ID, "conn").text == "API key needed"
        browser.find_element(By.ID, "key-input").send_keys("wrong")
        dialog.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait(browser, lambda d: "refused" in d.find_element(By.ID, "key-error").text)
        browser.find_element(By.ID, "key-input").send_keys("console-key")
        dialog.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        nodes = len(parse_graph(CONSOLE_GRAPH).nodes)
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#graph .node")) == nodes)
        assert (
            browser.execute_script("return sessionStorage.getItem('octograph.apiKey')")
            == "console-key"
        )
        # The key stays for this tab: a reload asks for nothing.
        browser.refresh()
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#graph .node")) == nodes)
        assert not browser.find_element(By.ID, "key-dialog").is_displayed()
        assert browser.find_element(By.ID, "conn").text == "live"
        # An API key that is not an admin key sees counters, and no one's routing decisions.
        wait(browser, lambda d: "admin keys" in d.find_element(By.ID, "dec-empty").text)
    finally:
        s.stop()


def test_console_shows_the_deployment_scope_and_its_loss(
    browser: Any, redis_server: RedisServer
) -> None:
    """With OCTOGRAPH_REDIS_URL the page says it shows every replica; with Redis gone, that it
    shows the one that answered, and why."""
    redis = redis_server
    s = ThreadedStack(settings_kw={"redis_url": redis.url}).start()
    try:
        browser.get(s.url + "/console")
        wait(browser, lambda d: d.find_element(By.ID, "scope").text == "all replicas")
        assert "pill-ok" in classes(browser.find_element(By.ID, "scope"))
        redis.stop()
        wait(browser, lambda d: "unreachable" in d.find_element(By.ID, "scope").text)
        scope = browser.find_element(By.ID, "scope")
        assert scope.get_attribute("data-scope") == "this replica"
        assert "pill-bad" in classes(scope)
    finally:
        s.stop()
        redis.stop()


# A stand-in for an ensemble's stream, served by the page's own fetch: the fake engines have no
# tokenizer files, so the gateway cannot run `blend` here. It carries weights the gateway never
# sends: the page must keep showing the graph's.
FAKE_ENSEMBLE_STREAM = """
const realFetch = window.fetch;
window.fetch = (url, opts) => {
  if (!String(url).endsWith("/v1/chat/completions")) return realFetch(url, opts);
  const chunk = (obj) => "data: " + JSON.stringify(obj) + "\\n\\n";
  const body = [
    chunk({choices: [{index: 0, delta: {role: "assistant", content: "mixed "}}],
           octograph: {route: ["blend"], scores: [], weights: [0.5, 0.5]}}),
    chunk({choices: [{index: 0, delta: {content: "bytes"}}], octograph: {weights: [0.2, 0.8]}}),
    chunk({choices: [{index: 0, delta: {}, finish_reason: "stop"}],
           octograph: {weights: {smollm2: 0.9, gemma3: 0.1}}}),
    "data: [DONE]\\n\\n",
  ].join("");
  return Promise.resolve(new Response(body, {status: 200, headers: {
    "content-type": "text/event-stream", "x-octograph-route": "blend"}}));
};
"""


def test_console_shows_ensemble_weights_and_errors(stack: ThreadedStack, browser: Any) -> None:
    browser.get(stack.url + "/console")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#graph .node[data-node="blend"]'))
    Select(browser.find_element(By.ID, "target")).select_by_value("blend")
    # The gateway refuses (no tokenizer files for fake models): the page says why.
    browser.find_element(By.ID, "prompt").send_keys("hello")
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda d: "tokenizer" in d.find_element(By.ID, "answer").text)
    assert browser.find_element(By.ID, "send").is_enabled()
    assert browser.find_element(By.ID, "weights-box").get_attribute("hidden") is not None

    browser.execute_script(FAKE_ENSEMBLE_STREAM)
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "1")
    assert browser.find_element(By.ID, "answer").text == "mixed bytes"
    assert "on-route" in classes(node_el(browser, "blend"))
    box = browser.find_element(By.ID, "weights-box")
    assert box.get_attribute("data-source") == "graph"
    rows = box.find_elements(By.CSS_SELECTOR, ".bar-row")
    values = {
        r.find_element(By.CSS_SELECTOR, ".label").text: r.find_element(By.CSS_SELECTOR, ".val").text
        for r in rows
    }
    blend = next(n for n in parse_graph(stack.graph_yaml).nodes.values() if n.kind == "ensemble")
    total = sum(m.weight for m in blend.members)  # type: ignore[union-attr]
    assert values == {m.model: f"{round(100 * m.weight / total)}%" for m in blend.members}  # type: ignore[union-attr]


REMOTE_GRAPH = """
models:
  local: {engine: fake}
  router: {engine: fake}
  hosted: {kind: openai, base_url: "http://127.0.0.1:9/v1", model: big-model, health_path: null}
root: root
nodes:
  root: {kind: router, model: router, children: [near, far], fallback: near}
  near: {kind: model, model: local, description: "A model on our own worker."}
  far: {kind: model, model: hosted, description: "A model behind an OpenAI-compatible API."}
"""


def test_console_marks_remote_nodes(browser: Any) -> None:
    s = ThreadedStack(graph_yaml=REMOTE_GRAPH).start()
    try:
        browser.get(s.url + "/console")
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#graph .node")) == 3)
        far, near = node_el(browser, "far"), node_el(browser, "near")
        assert "remote" in classes(far) and "remote" not in classes(near)
        assert far.find_element(By.CSS_SELECTOR, "text.kind").text.lower() == "remote model"
        assert "OpenAI-compatible upstream" in far.find_element(
            By.CSS_SELECTOR, "title"
        ).get_attribute("textContent")
        # Health is live: the local model's worker goes away, its node turns red.
        assert near.get_attribute("data-health") == "healthy"
        s.stop_worker("local")
        wait(browser, lambda d: node_el(d, "near").get_attribute("data-health") == "down")
        dot = node_el(browser, "near").find_element(By.CSS_SELECTOR, "circle.health")
        assert (
            browser.execute_script("return getComputedStyle(arguments[0]).fill", dot)
            == "rgb(220, 38, 38)"
        )
        assert node_el(browser, "far").get_attribute("data-health") == "healthy"
        assert "2/3 models up" in browser.find_element(By.ID, "summary").text
    finally:
        s.stop()

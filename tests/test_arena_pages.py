"""The arena's pages in headless Chromium, on a real server (a model store of three policies
with names nobody could guess, and a reward model) with an annotator, a client and an admin
token.

Blind labeling: an annotator's comparison is the server's choice, and neither what the page
receives nor what it shows names a model before the vote; the operator panel (choosing the
models and the decoding) is the admin's only, and a chosen matchup without admin rights is
refused (403) and said so. The leaderboard draws the ratings as a forest plot and the win
rates as a heat map; the annotators page reports who voted and how far they agree (admin)."""

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rlhfkit.server.app import ServeConfig, ServerThread

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from test_labeling_page import CHROMEDRIVER, CHROMIUM, browser, script_errors  # noqa: E402, F401 - fixtures

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")

# name: (stage, version). The role names (policy, reference) are not identities; these are.
POLICIES = {"ppo-zebra": ("ppo", "v-zebra-7"), "sft-quokka": ("sft", "v-quokka-3"), "dpo-heron": ("dpo", "v-heron-5")}
SECRETS = [*POLICIES, *(version for _, version in POLICIES.values()), "zebra", "quokka", "heron"]
TOKEN = {"annotator": "annotator-token-for-the-arena", "client": "client-token-for-the-arena",
         "admin": "admin-token-for-the-arena"}
NAME = {"annotator": "ann-blind", "client": "app-1", "admin": "root"}
SCREENS = Path("/tmp/rlhfkit-screens")


@pytest.fixture(scope="module")
def model_store(tmp_path_factory, tiny_tokenizer):
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from rlhfkit.training.checkpoint import publish_checkpoint
    from rlhfkit.training.tiny import tiny_llama_config

    root = tmp_path_factory.mktemp("arena") / "store"
    for seed, (name, (stage, version)) in enumerate(POLICIES.items()):
        torch.manual_seed(seed)
        publish_checkpoint(LlamaForCausalLM(tiny_llama_config(tiny_tokenizer)), tiny_tokenizer, root / name,
                           stage=stage, parent=None, extra={"version": version})
    config = tiny_llama_config(tiny_tokenizer)
    config.num_labels = 1
    publish_checkpoint(LlamaForSequenceClassification(config), tiny_tokenizer, root / "rm-owl", stage="rm",
                       parent=None, extra={"version": "v-owl-1"})
    (root / "roles.json").write_text(json.dumps({"policy": "ppo-zebra", "reference": "sft-quokka",
                                                 "reward": "rm-owl", "serve": ["dpo-heron"]}))
    return root


def serve(model_store, root: Path) -> ServerThread:
    tokens = root / "tokens.json"
    tokens.write_text(json.dumps({TOKEN[role]: {"name": NAME[role], "role": role} for role in TOKEN}))
    srv = ServerThread(ServeConfig(store=str(model_store), reload_interval=0, port=0, metrics_port=0, device="cpu",
                                   feedback_db=f"sqlite:///{root / 'fb.db'}", auth_tokens=str(tokens),
                                   arena_sampling='{"temperature": 0.7, "max_new_tokens": 6}')).wait_loaded()
    srv.http = f"http://127.0.0.1:{srv.server.metrics_port}"
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_store):
    """For labeling: its battles are the arena's (random pairs and winners)."""
    srv = serve(model_store, tmp_path_factory.mktemp("label"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def board_server(tmp_path_factory, model_store):
    """For the leaderboard and annotators pages: battles chosen by the test."""
    srv = serve(model_store, tmp_path_factory.mktemp("board"))
    yield srv
    srv.stop()


def call(srv, path, body=None, role="annotator"):
    """(status, reply JSON) of GET path, or POST body."""
    headers = {"Authorization": f"Bearer {TOKEN[role]}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(srv.http + path, data=None if body is None else json.dumps(body).encode(),
                                 headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def open_as(browser, srv, path, role):
    """The page at `path`, signed in with the role's token (kept for the tab, as api.js keeps it)."""
    browser.get(srv.http + "/static/style.css")
    browser.execute_script("sessionStorage.setItem('rlhfkit-token', arguments[0])", TOKEN[role])
    browser.get(srv.http + path)


# Every fetch the page makes from now on, with its request body and the reply's text.
CAPTURE_FETCH = """
window.captured = [];
const realFetch = window.fetch;
window.fetch = async (path, init) => {
  const resp = await realFetch(path, init);
  window.captured.push({path: String(path), body: (init && init.body) || null, status: resp.status,
                        reply: await resp.clone().text()});
  return resp;
};
"""


def captured(browser, path=None):
    return [c for c in browser.execute_script("return window.captured") if path is None or c["path"] == path]


def named(text):
    """The served models' names and versions that occur in `text`."""
    return [s for s in SECRETS if s in text]


def page_html(browser):
    return browser.execute_script("return document.documentElement.outerHTML")


def screenshot(browser, tmp_path, name):
    """The whole page as a PNG in tmp_path, copied to /tmp/rlhfkit-screens for a person to look at."""
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(height + 140, 4000))
    path = tmp_path / name
    browser.save_screenshot(str(path))
    SCREENS.mkdir(exist_ok=True)
    shutil.copy(path, SCREENS / name)
    print(f"screenshot: {path} (and {SCREENS / name})")
    return path


def wait_battle(browser, wait):
    wait.until(lambda b: b.find_element(By.ID, "battle").is_displayed() and b.find_element(By.ID, "left").text
               and not b.find_element(By.ID, "compare").get_attribute("disabled"))


def test_annotator_gets_blind_server_chosen_matchups(server, browser, tmp_path):
    wait = WebDriverWait(browser, 60)
    open_as(browser, server, "/", "annotator")
    wait.until(lambda b: b.find_element(By.ID, "annotator").get_attribute("value") == NAME["annotator"])
    # No operator panel: no choice of models, no decoding box, and the model list never asked for.
    for id_ in ("operator", "source", "model-a", "samples-of", "temperature", "max-new-tokens", "model-names"):
        assert browser.find_elements(By.ID, id_) == [], id_
    assert not [e for e in browser.execute_script("return performance.getEntriesByType('resource')"
                                                   ".map((e) => e.name)") if "/api/models" in e]
    browser.execute_script(CAPTURE_FETCH)
    browser.find_element(By.ID, "prompt").send_keys("the cat")
    browser.find_element(By.ID, "compare").click()
    wait_battle(browser, wait)
    [sent] = captured(browser, "/api/comparisons")
    assert json.loads(sent["body"]) == {"prompt": "the cat"}  # no models, samples_of nor sampling
    reply = json.loads(sent["reply"])
    assert sent["status"] == 200 and set(reply) == {"comparison_id", "prompt", "left", "right", "messages"}
    assert named(sent["reply"]) == []
    assert named(page_html(browser)) == []
    screenshot(browser, tmp_path, "label-annotator.png")
    # The same request outside the browser: the reply names no model either.
    status, again = call(server, "/api/comparisons", {"prompt": "the cat"})
    assert status == 200 and named(json.dumps(again)) == []

    browser.find_element(By.TAG_NAME, "body").click()
    browser.find_element(By.TAG_NAME, "body").send_keys("1")  # keyboard vote: left
    wait.until(lambda b: b.find_element(By.ID, "reveal").is_displayed())
    reveal = browser.find_element(By.ID, "reveal").text
    sides = reveal.removeprefix("Left was ").split(". Vote")[0].split(", right was ")
    assert len(sides) == 2 and set(sides) <= set(POLICIES) and sides[0] != sides[1], reveal
    assert browser.find_element(By.ID, "left-model").text == f"{sides[0]}@{POLICIES[sides[0]][1]}"
    assert browser.find_element(By.ID, "right-model").text == f"{sides[1]}@{POLICIES[sides[1]][1]}"
    [vote] = captured(browser, "/api/votes")
    assert json.loads(vote["body"]) == {"comparisonId": reply["comparison_id"], "choice": "CHOICE_LEFT"}

    # The next comparison: the last pair's names are gone from the page before this vote.
    browser.find_element(By.ID, "compare").click()
    wait.until(lambda b: not b.find_element(By.ID, "reveal").is_displayed())
    wait_battle(browser, wait)
    assert named(page_html(browser)) == []
    browser.find_element(By.ID, "vote-tie").click()
    wait.until(lambda b: b.find_element(By.ID, "reveal").is_displayed())
    assert len(named(page_html(browser))) >= 2

    # Choosing the models (or two samples of one) needs admin: 403, for a client too.
    for body in ({"prompt": "the cat", "models": {"modelA": "ppo-zebra", "modelB": "sft-quokka"}},
                 {"prompt": "the cat", "samplesOf": "ppo-zebra", "sampling": {"temperature": 1.0}}):
        for role in ("annotator", "client"):
            status, refusal = call(server, "/api/comparisons", body, role=role)
            assert (status, refusal["code"]) == (403, "PERMISSION_DENIED"), (role, body, refusal)
    # ...and the page says so plainly should such a token get hold of the panel.
    browser.execute_script("showOperatorPanel(true)")
    Select(browser.find_element(By.ID, "source")).select_by_value("models")
    browser.find_element(By.ID, "model-a").send_keys("ppo-zebra")
    browser.find_element(By.ID, "model-b").send_keys("sft-quokka")
    browser.find_element(By.ID, "compare").click()
    wait.until(lambda b: "PERMISSION_DENIED" in b.find_element(By.ID, "status").text)
    assert browser.find_element(By.ID, "status").text.startswith("Choosing the models needs an admin token.")
    assert browser.find_element(By.ID, "status").get_attribute("class") == "error"
    assert script_errors(browser) == []


def test_admin_has_the_operator_panel_with_the_arena_first(server, browser, tmp_path):
    wait = WebDriverWait(browser, 60)
    open_as(browser, server, "/", "admin")
    wait.until(lambda b: b.find_elements(By.ID, "operator"))
    assert browser.find_element(By.ID, "annotator").get_attribute("value") == NAME["admin"]
    assert Select(browser.find_element(By.ID, "source")).first_selected_option.get_attribute("value") == "arena"
    assert not browser.find_element(By.ID, "temperature").is_displayed()  # the arena's decoding is the server's
    assert named(page_html(browser)) == []  # the model list is fetched only once models are to be chosen
    browser.execute_script(CAPTURE_FETCH)
    browser.find_element(By.ID, "prompt").send_keys("the dog")
    browser.find_element(By.ID, "compare").click()
    wait_battle(browser, wait)
    assert json.loads(captured(browser, "/api/comparisons")[0]["body"]) == {"prompt": "the dog"}
    browser.find_element(By.ID, "vote-right").click()
    wait.until(lambda b: b.find_element(By.ID, "reveal").is_displayed())

    Select(browser.find_element(By.ID, "source")).select_by_value("models")
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#model-names option")) == len(POLICIES))
    assert browser.find_element(By.ID, "temperature").is_displayed()
    for field, value in (("model-a", "ppo-zebra"), ("model-b", "dpo-heron"), ("temperature", "0"),
                         ("max-new-tokens", "4")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "compare").click()
    wait.until(lambda b: not b.find_element(By.ID, "reveal").is_displayed())
    wait_battle(browser, wait)
    assert json.loads(captured(browser, "/api/comparisons")[1]["body"]) == {
        "prompt": "the dog", "sampling": {"temperature": 0, "maxNewTokens": 4},
        "models": {"modelA": "ppo-zebra", "modelB": "dpo-heron"}}
    browser.find_element(By.TAG_NAME, "body").click()
    browser.find_element(By.TAG_NAME, "body").send_keys("4")
    wait.until(lambda b: b.find_element(By.ID, "reveal").is_displayed())
    assert set(browser.find_element(By.ID, "reveal").text.split(".")[0].removeprefix("Left was ")
               .split(", right was ")) == {"ppo-zebra", "dpo-heron"}
    screenshot(browser, tmp_path, "label-admin.png")
    assert script_errors(browser) == []


RED, WHITE, BLUE, GREY = "rgb(202, 0, 32)", "rgb(255, 255, 255)", "rgb(5, 113, 176)", "#e6e6e6"


def battle(srv, a, b, outcomes):
    """A comparison of models a and b, voted by each role in `outcomes` for the model named
    (or "tie"). The sides are drawn at random: the test reads them from the store."""
    status, comp = call(srv, "/api/comparisons", {"prompt": f"{a} or {b}?", "models": {"modelA": a, "modelB": b},
                                                  "sampling": {"maxNewTokens": 4}}, role="admin")
    assert status == 200, comp
    left = srv.server.feedback_store.get_comparison(comp["comparison_id"])["left_model"]
    for role, outcome in outcomes.items():
        choice = "CHOICE_TIE" if outcome == "tie" else "CHOICE_LEFT" if outcome == left else "CHOICE_RIGHT"
        status, vote = call(srv, "/api/votes", {"comparisonId": comp["comparison_id"], "choice": choice}, role=role)
        assert status == 200, vote


@pytest.fixture(scope="module")
def battles(board_server):
    """ppo-zebra beats sft-quokka every time (6 battles); dpo-heron and sft-quokka split 2-2;
    ppo-zebra and dpo-heron never meet. The two annotators agree on 3 of 5 comparisons."""
    for _ in range(3):
        battle(board_server, "ppo-zebra", "sft-quokka", {"annotator": "ppo-zebra", "admin": "ppo-zebra"})
    battle(board_server, "dpo-heron", "sft-quokka", {"annotator": "dpo-heron", "admin": "sft-quokka"})
    battle(board_server, "sft-quokka", "dpo-heron", {"annotator": "sft-quokka", "admin": "dpo-heron"})
    _, board = call(board_server, "/api/leaderboard", role="client")
    return board


def test_leaderboard_draws_intervals_and_win_rates(board_server, battles, browser, tmp_path):
    wait = WebDriverWait(browser, 60)
    open_as(browser, board_server, "/leaderboard", "client")
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#heatmap rect.cell"))
    assert browser.find_element(By.ID, "summary").text == "10 battles from 10 votes."
    models = [r["model"] for r in battles["ratings"]]
    assert set(models) == set(POLICIES) and models[0] == "ppo-zebra"

    # The forest plot: one row per model, best first, each interval's bar around its dot.
    rows = browser.find_elements(By.CSS_SELECTOR, "#forest g.forest-row")
    assert [r.get_attribute("data-model") for r in rows] == models
    assert [r.find_element(By.CSS_SELECTOR, "text.label").text for r in rows] == [
        f"{r['model']} ({r['battles']} battles)" for r in battles["ratings"]]
    for row, rating in zip(rows, battles["ratings"]):
        for kind in ("bt", "style"):
            line = row.find_element(By.CSS_SELECTOR, f"g.{kind} line.interval")
            dot = row.find_element(By.CSS_SELECTOR, f"g.{kind} circle.point")
            x1, cx, x2 = (float(e.get_attribute(a)) for e, a in ((line, "x1"), (dot, "cx"), (line, "x2")))
            assert x1 < cx < x2, (rating["model"], kind, x1, cx, x2)
            # Drawn where the attributes say: the dot's centre on screen lies within its bar.
            bar, point = (browser.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                                 "return [r.left, r.right]", e) for e in (line, dot))
            assert bar[0] < (point[0] + point[1]) / 2 < bar[1]
    # The same scale for every row: a higher rating is further right.
    bt_x = [float(r.find_element(By.CSS_SELECTOR, "g.bt circle.point").get_attribute("cx")) for r in rows]
    assert bt_x == sorted(bt_x, reverse=True)
    ticks = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#forest text.tick")]
    assert len(ticks) >= 3 and all(t.lstrip("-").isdigit() for t in ticks)

    # The heat map: models x models cells; the sure win blue, its loss red, the even split white,
    # never met (and the diagonal) grey.
    cells = {(c.get_attribute("data-row"), c.get_attribute("data-col")): c.get_attribute("fill")
             for c in browser.find_elements(By.CSS_SELECTOR, "#heatmap rect.cell")}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmap rect.cell")) == len(battles["models"]) ** 2
    assert set(cells) == {(a, b) for a in battles["models"] for b in battles["models"]}
    assert cells["ppo-zebra", "sft-quokka"] == BLUE and cells["sft-quokka", "ppo-zebra"] == RED
    assert cells["dpo-heron", "sft-quokka"] == cells["sft-quokka", "dpo-heron"] == WHITE
    assert cells["ppo-zebra", "dpo-heron"] == cells["dpo-heron", "ppo-zebra"] == GREY
    assert all(cells[m, m] == GREY for m in battles["models"])
    texts = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#heatmap text.pct, #heatmap text.count")]
    assert sorted(texts) == sorted(["100%", "6 battles", "0%", "6 battles", "50%", "4 battles", "50%", "4 battles"])

    # The tables: ratings with the style-controlled column, win rates, style coefficients, the prior.
    table = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
             for tr in browser.find_elements(By.CSS_SELECTOR, "#ratings tbody tr")]
    assert [r[1] for r in table] == models
    assert table[0][3] == (f"{battles['ratings'][0]['style_controlled']:.1f} "
                           f"({battles['ratings'][0]['style_controlled_lower']:.1f} – "
                           f"{battles['ratings'][0]['style_controlled_upper']:.1f})")
    assert [r[5:] for r in table][0] == ["6", "6", "0", "0", "0"]
    style = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
             for tr in browser.find_elements(By.CSS_SELECTOR, "#style tbody tr")]
    assert [r[0] for r in style] == [s["feature"] for s in battles["style"]] and style
    assert browser.find_element(By.ID, "prior-sd").text == f"{battles['prior_sd']:.0f}"
    note = browser.find_element(By.CSS_SELECTOR, "main .note").text
    assert "Laplace" in note and "bootstrap" in note and "spans two" in note
    screenshot(browser, tmp_path, "leaderboard.png")
    assert script_errors(browser) == []


def test_annotators_page_for_admins(board_server, battles, browser, tmp_path):
    wait = WebDriverWait(browser, 60)
    status, refusal = call(board_server, "/api/annotators", role="annotator")
    assert (status, refusal["code"]) == (403, "PERMISSION_DENIED") and "admin" in refusal["error"]
    _, report = call(board_server, "/api/annotators?days=14", role="admin")
    assert report == call(board_server, "/api/annotators", {"days": 14}, role="admin")[1]  # GET query = POST body
    assert sorted(a["annotator"] for a in report["annotators"]) == ["ann-blind", "root"]
    for query in ("days=7&days=8", "days=seven", "weeks=2", "days=400"):
        status, refusal = call(board_server, f"/api/annotators?{query}", role="admin")
        assert (status, refusal["code"]) == (400, "INVALID_ARGUMENT"), (query, refusal)

    # An annotator's token on the page: the refusal is shown, with a way to sign in again.
    open_as(browser, board_server, "/annotators", "annotator")
    wait.until(lambda b: "PERMISSION_DENIED" in b.find_element(By.ID, "summary").text)
    browser.find_element(By.CSS_SELECTOR, "#summary button").click()
    wait.until(lambda b: b.find_elements(By.ID, "token") and b.find_element(By.ID, "token").is_displayed())
    browser.find_element(By.ID, "token").send_keys(TOKEN["admin"])
    browser.find_element(By.ID, "sign-in").click()

    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#annotators tbody tr")) == 2)
    rows = {tr.find_element(By.TAG_NAME, "td").text: [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in browser.find_elements(By.CSS_SELECTOR, "#annotators tbody tr")}
    for a in report["annotators"]:
        majority = f"{100 * a['agreement_with_majority']:.0f}% ({a['majority_comparisons']})"
        assert rows[a["annotator"]][:4] == [a["annotator"], "5", "5", majority]
        assert a["votes"] == 5 and majority == "60% (5)"
        reward = a.get("agreement_with_reward_model")
        assert rows[a["annotator"]][4] == (f"– ({a['reward_comparisons']})" if reward is None
                                           else f"{100 * reward:.0f}% ({a['reward_comparisons']})")
    bars = browser.find_elements(By.CSS_SELECTOR, "#annotators tbody tr:first-child svg.daily rect")
    assert len(bars) == 14
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert bars[-1].find_element(By.TAG_NAME, "title").get_attribute("textContent") == f"{today}: 5 votes"
    assert float(bars[-1].get_attribute("height")) > float(bars[0].get_attribute("height"))
    [pair] = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
              for tr in browser.find_elements(By.CSS_SELECTOR, "#pairs tbody tr")]
    [expected] = report["pairs"]
    assert pair == [expected["annotator_a"], expected["annotator_b"], "5", f"{expected['cohen_kappa']:.3f}"]
    assert browser.find_element(By.ID, "fleiss").text == (
        f"Fleiss' kappa {report['fleiss_kappa']:.3f} over 5 comparisons with 2 annotators each.")
    assert "No daily cap" in browser.find_element(By.ID, "summary").text
    screenshot(browser, tmp_path, "annotators.png")
    Select(browser.find_element(By.ID, "days")).select_by_visible_text("7")
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#annotators tbody tr:first-child svg.daily rect")) == 7)
    assert script_errors(browser) == []

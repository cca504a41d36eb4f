"""The labeling page in headless Chromium: sign in with an operator's (admin) token, draw a
prompt, compare two samples of one model (the operator panel), vote (click and key), see the
reveal, find the votes in the store under the token's name; the leaderboard page shows the
ratings (an annotator's blind, server-chosen matchups: test_arena_pages.py). A drawn
conversation is shown turn by turn, as text, and compared as messages, on a server without
tokens (no sign-in asked)."""

import json
import shutil
import urllib.error
import urllib.request

import pytest

from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.server.feedback import FeedbackStore

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from test_client_chat import chat_model_dirs  # noqa: E402, F401 - a fixture

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")


# An admin's: only the operator panel chooses what answers (here two samples of one model).
OPERATOR_TOKEN = "operator-token-for-the-page"
TOKENS = {OPERATOR_TOKEN: {"name": "ann-7", "role": "admin"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_policy_dir, tiny_tokenizer):
    """A server with tokens: the page asks for one."""
    from rlhfkit.training.tiny import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "other", "policy", tiny_tokenizer, seed=5)
    db = tmp_path_factory.mktemp("fb") / "feedback.db"
    tokens = db.parent / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), reference=str(other), port=0, metrics_port=0,
                                   device="cpu", feedback_db=f"sqlite:///{db}", auth_tokens=str(tokens))).wait_loaded()
    srv.db = db
    srv.http = f"http://127.0.0.1:{srv.server.metrics_port}"
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


JSON_WITH_TOKEN = {"Content-Type": "application/json", "Authorization": f"Bearer {OPERATOR_TOKEN}"}


def post(server, path, body):
    req = urllib.request.Request(server.http + path, data=json.dumps(body).encode(), method="POST",
                                 headers=JSON_WITH_TOKEN)
    return json.loads(urllib.request.urlopen(req).read())


def test_json_api_errors_name_the_field(server):
    req = urllib.request.Request(server.http + "/api/votes", data=json.dumps(
        {"comparisonId": "0" * 32, "choice": "CHOICE_LEFT"}).encode(), method="POST", headers=JSON_WITH_TOKEN)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 404 and json.loads(e.value.read())["code"] == "NOT_FOUND"
    req = urllib.request.Request(server.http + "/api/comparisons", data=b'{"prompt": 3}', method="POST",
                                 headers=JSON_WITH_TOKEN)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "prompt" in json.loads(e.value.read())["error"]
    assert b"rlhfkit:feedback_votes" in urllib.request.urlopen(server.http + "/metrics").read()


def script_errors(browser) -> list[str]:
    """What the page's scripts logged (content security policy violations, exceptions);
    the refused requests (401s) are the network's entries, not these."""
    return [e["message"] for e in browser.get_log("browser") if e["source"] != "network"]


def sign_in(browser, wait, token):
    wait.until(lambda b: b.find_elements(By.ID, "token") and b.find_element(By.ID, "token").is_displayed())
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "sign-in").click()


def test_label_vote_reveal_and_leaderboard(server, browser):
    wait = WebDriverWait(browser, 60)
    browser.get(server.http + "/")
    # The server answers 401: the page asks for a token. A wrong one is refused and asked again.
    sign_in(browser, wait, "not-a-token-of-this-server")
    wait.until(lambda b: "does not accept" in b.find_element(By.ID, "login").text)
    sign_in(browser, wait, OPERATOR_TOKEN)
    wait.until(lambda b: not b.find_elements(By.ID, "login")
               and b.find_element(By.ID, "annotator").get_attribute("value") == "ann-7")
    assert browser.find_element(By.ID, "annotator").get_attribute("readOnly") == "true"
    assert browser.execute_script("return sessionStorage.getItem('rlhfkit-token')") == OPERATOR_TOKEN
    browser.find_element(By.ID, "draw").click()
    wait.until(lambda b: b.find_element(By.ID, "prompt").get_attribute("value"))
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("the cat")
    Select(browser.find_element(By.ID, "source")).select_by_value("samples")  # the operator panel; "" = policy
    browser.find_element(By.ID, "compare").click()
    wait.until(lambda b: b.find_element(By.ID, "battle").is_displayed() and b.find_element(By.ID, "left").text)
    # textContent, not .text: WebDriver's .text normalises whitespace, the store keeps it exact.
    left, right = (browser.find_element(By.ID, side).get_attribute("textContent") for side in ("left", "right"))
    assert browser.find_element(By.ID, "left-model").text == ""  # anonymous until the vote
    browser.find_element(By.ID, "vote-left").click()
    wait.until(lambda b: b.find_element(By.ID, "reveal").is_displayed())
    reveal = browser.find_element(By.ID, "reveal").text
    assert "Left was policy, right was policy" in reveal
    assert browser.find_element(By.ID, "left-model").text.startswith("policy@")

    # A second comparison, voted with the keyboard: 2 = right.
    browser.find_element(By.ID, "compare").click()
    wait.until(lambda b: not b.find_element(By.ID, "reveal").is_displayed())
    browser.find_element(By.TAG_NAME, "body").click()  # focus off the inputs: keys vote
    browser.find_element(By.TAG_NAME, "body").send_keys("2")
    wait.until(lambda b: b.find_element(By.ID, "reveal").is_displayed())

    store = FeedbackStore(f"sqlite:///{server.db}")
    rows = store.voted_comparisons()
    store.close()
    assert [(r["choice"], r["annotator_id"], r["prompt"]) for r in rows] == [("left", "ann-7", "the cat"),
                                                                              ("right", "ann-7", "the cat")]
    assert (rows[0]["left_response"], rows[0]["right_response"]) == (left, right)
    assert rows[0]["vote_id"] in reveal

    # Both votes were between two samples of one model: no battles yet. One battle through the
    # JSON API: the left model wins and tops the leaderboard page.
    comp = post(server, "/api/comparisons", {"prompt": "the dog", "models": {"modelA": "policy", "modelB": "reference"},
                                             "sampling": {"maxNewTokens": 3}})
    winner = post(server, "/api/votes", {"comparisonId": comp["comparison_id"], "choice": "CHOICE_LEFT"})["left_model"]
    browser.get(server.http + "/leaderboard")  # the token is kept for the tab: no second sign-in
    wait.until(lambda b: "votes" in b.find_element(By.ID, "summary").text)
    assert browser.find_element(By.ID, "summary").text == "1 battle from 3 votes."
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in browser.find_elements(By.CSS_SELECTOR, "#ratings tbody tr")]
    assert [r[:2] for r in rows] == [["1", winner], ["2", ({"policy", "reference"} - {winner}).pop()]]
    assert [r[5:] for r in rows] == [["1", "1", "0", "0", "0"], ["1", "0", "1", "0", "0"]]
    assert browser.find_elements(By.ID, "login") == []
    assert script_errors(browser) == []


XSS = "<img src=x onerror=alert(1)>"
CONVERSATION = [{"role": "system", "content": "be brief & <b>bold</b>"},
                {"role": "user", "content": XSS},
                {"role": "assistant", "content": "one\ntwo"},
                {"role": "user", "content": "and <script>alert(2)</script>?"}]


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory, chat_model_dirs):  # noqa: F811
    root = tmp_path_factory.mktemp("chatpage")
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": CONVERSATION}) + "\n")  # TRL's conversational prompt
    srv = ServerThread(ServeConfig(policy=str(chat_model_dirs["policy"]), reference=str(chat_model_dirs["other"]),
                                   port=0, metrics_port=0, device="cpu", feedback_db=f"sqlite:///{root / 'fb.db'}",
                                   feedback_prompts=str(prompts))).wait_loaded()
    srv.db = root / "fb.db"
    srv.http = f"http://127.0.0.1:{srv.server.metrics_port}"
    yield srv
    srv.stop()


def turns(browser, container_id):
    container = browser.find_element(By.ID, container_id)
    return [{"role": t.find_element(By.CLASS_NAME, "role").get_attribute("textContent"),
             "content": t.find_element(By.CLASS_NAME, "content").get_attribute("textContent")}
            for t in container.find_elements(By.CLASS_NAME, "turn")]


def test_drawn_conversation_is_shown_as_text_and_compared_as_messages(chat_server, browser):
    from rlhfkit.clients import Client

    with Client(chat_server.address, timeout=60) as c:  # what each model answers, greedy
        text = {m: c.generate(messages=CONVERSATION, model=m, max_new_tokens=6).completions[0].text
                for m in ("policy", "reference")}
    assert text["policy"] != text["reference"]
    wait = WebDriverWait(browser, 60)
    browser.get(chat_server.http + "/")
    browser.execute_script("window.alerted = []; window.alert = (x) => window.alerted.push(String(x));")
    browser.find_element(By.ID, "draw").click()
    wait.until(lambda b: b.find_element(By.ID, "drawn").is_displayed())
    assert not browser.find_element(By.ID, "prompt").is_displayed()
    assert turns(browser, "drawn-conversation") == CONVERSATION
    wait.until(lambda b: b.find_elements(By.ID, "operator"))  # the panel: a server without tokens is open
    Select(browser.find_element(By.ID, "source")).select_by_value("models")
    for field, value in (("model-a", "policy"), ("model-b", "reference"), ("temperature", "0"),
                         ("max-new-tokens", "6")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "compare").click()
    wait.until(lambda b: b.find_element(By.ID, "battle").is_displayed() and b.find_element(By.ID, "left").text)
    assert browser.find_element(By.ID, "battle-conversation").is_displayed()
    assert turns(browser, "battle-conversation") == CONVERSATION
    left, right = (browser.find_element(By.ID, side).get_attribute("textContent") for side in ("left", "right"))
    assert {left, right} == set(text.values())
    # The markup in the messages is text on the page: no element was made from it, nothing ran.
    assert browser.find_elements(By.TAG_NAME, "img") == [] and browser.find_elements(By.CSS_SELECTOR, "main b") == []
    assert {e.tag_name for e in browser.find_elements(By.CSS_SELECTOR, ".conversation *")} == {"div", "span", "pre"}
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 2  # api.js, label.js
    browser.find_element(By.TAG_NAME, "body").click()
    browser.find_element(By.TAG_NAME, "body").send_keys("1")
    wait.until(lambda b: b.find_element(By.ID, "reveal").is_displayed())
    assert browser.execute_script("return window.alerted") == []

    # Back to a typed prompt: a text comparison, no conversation shown.
    browser.find_element(By.ID, "type-instead").click()
    assert browser.find_element(By.ID, "prompt").is_displayed()
    assert not browser.find_element(By.ID, "drawn").is_displayed()
    browser.find_element(By.ID, "prompt").send_keys("the cat")
    browser.find_element(By.ID, "compare").click()
    wait.until(lambda b: not b.find_element(By.ID, "reveal").is_displayed() and b.find_element(By.ID, "left").text)
    assert not browser.find_element(By.ID, "battle-conversation").is_displayed()
    browser.find_element(By.TAG_NAME, "body").click()
    browser.find_element(By.TAG_NAME, "body").send_keys("2")
    wait.until(lambda b: b.find_element(By.ID, "reveal").is_displayed())

    assert browser.find_elements(By.ID, "login") == []  # a server without tokens asks for none
    assert script_errors(browser) == []
    store = FeedbackStore(f"sqlite:///{chat_server.db}")
    rows = store.voted_comparisons()
    store.close()
    assert all(r["annotator_id"].startswith("anon-") for r in rows)
    assert [(r["choice"], r["prompt"], r["messages"]) for r in rows] == [("left", "", CONVERSATION),
                                                                          ("right", "the cat", None)]
    assert (rows[0]["left_response"], rows[0]["right_response"]) == (left, right)

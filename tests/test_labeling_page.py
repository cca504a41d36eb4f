"""The labeling page in headless Chromium: draw a prompt, compare, vote (click and key),
see the reveal, find the votes in the store; the leaderboard page shows the ratings."""

import json
import shutil
import urllib.error
import urllib.request

import pytest

from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.server.feedback import FeedbackStore

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_policy_dir, tiny_tokenizer):
    from rlhfkit.training.tiny import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "other", "policy", tiny_tokenizer, seed=5)
    db = tmp_path_factory.mktemp("fb") / "feedback.db"
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), reference=str(other), port=0, metrics_port=0,
                                   device="cpu", feedback_db=f"sqlite:///{db}")).wait_loaded()
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


def post(server, path, body):
    req = urllib.request.Request(server.http + path, data=json.dumps(body).encode(), method="POST")
    return json.loads(urllib.request.urlopen(req).read())


def test_json_api_errors_name_the_field(server):
    req = urllib.request.Request(server.http + "/api/votes", data=json.dumps(
        {"comparisonId": "0" * 32, "choice": "CHOICE_LEFT", "annotatorId": "x"}).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 404 and json.loads(e.value.read())["code"] == "NOT_FOUND"
    req = urllib.request.Request(server.http + "/api/comparisons", data=b'{"prompt": 3}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "prompt" in json.loads(e.value.read())["error"]
    assert b"rlhfkit:feedback_votes" in urllib.request.urlopen(server.http + "/metrics").read()


def test_label_vote_reveal_and_leaderboard(server, browser):
    wait = WebDriverWait(browser, 60)
    browser.get(server.http + "/")
    browser.find_element(By.ID, "draw").click()
    wait.until(lambda b: b.find_element(By.ID, "prompt").get_attribute("value"))
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("the cat")
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
    annotator = browser.find_element(By.ID, "annotator").get_attribute("value")

    # A second comparison, voted with the keyboard: 2 = right.
    browser.find_element(By.ID, "compare").click()
    wait.until(lambda b: not b.find_element(By.ID, "reveal").is_displayed())
    browser.find_element(By.TAG_NAME, "body").click()  # focus off the inputs: keys vote
    browser.find_element(By.TAG_NAME, "body").send_keys("2")
    wait.until(lambda b: b.find_element(By.ID, "reveal").is_displayed())

    store = FeedbackStore(f"sqlite:///{server.db}")
    rows = store.voted_comparisons()
    store.close()
    assert [(r["choice"], r["annotator_id"], r["prompt"]) for r in rows] == [("left", annotator, "the cat"),
                                                                              ("right", annotator, "the cat")]
    assert (rows[0]["left_response"], rows[0]["right_response"]) == (left, right)
    assert rows[0]["vote_id"] in reveal

    # Both votes were between two samples of one model: no battles yet. One battle through the
    # JSON API: the left model wins and tops the leaderboard page.
    comp = post(server, "/api/comparisons", {"prompt": "the dog", "models": {"modelA": "policy", "modelB": "reference"},
                                             "sampling": {"maxNewTokens": 3}})
    winner = post(server, "/api/votes", {"comparisonId": comp["comparison_id"], "choice": "CHOICE_LEFT",
                                         "annotatorId": "api"})["left_model"]
    browser.get(server.http + "/leaderboard")
    wait.until(lambda b: "votes" in b.find_element(By.ID, "summary").text)
    assert browser.find_element(By.ID, "summary").text == "1 battle from 3 votes."
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in browser.find_elements(By.CSS_SELECTOR, "#ratings tbody tr")]
    assert [r[:2] for r in rows] == [["1", winner], ["2", ({"policy", "reference"} - {winner}).pop()]]
    assert [r[5:] for r in rows] == [["1", "1", "0", "0", "0"], ["1", "0", "1", "0", "0"]]

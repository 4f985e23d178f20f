"""End to end in a real headless browser: a person labels pairs, the server is SIGKILLed and restarted,
the page resumes, nothing is lost, and the labels train a reward model.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); without them the test is
skipped with the command that installs them.
"""

from __future__ import annotations

import json

import pytest
from conftest import train_cli
from feedback_support import (
    PNG,
    ServerProcess,
    browser_session,
    demo_candidates,
    feedback_cli,
    free_port,
    write_candidates,
)

from lightrlhf.feedback.__main__ import main as feedback_main
from lightrlhf.feedback.labels import read_labels

SCRIPT = "<script>window.pwned = 1; document.title = 'pwned'</script><img src=x onerror=\"window.pwned = 2\">"
CHINESE = ("请用一句话解释河流和雨 :", "下雨以后，河水慢慢上涨，流进湖里。", "雨 雨 雨")
LONG = "\n".join(f"{i}. the river and the rain flow gently to the lake ." for i in range(1, 121))


@pytest.fixture(scope="module")
def browser():
    yield from browser_session()


def candidates_for_the_page(folder) -> list[dict]:
    rows = demo_candidates(8)
    rows[1]["b"] = SCRIPT
    rows[2].update(prompt=CHINESE[0], a=CHINESE[1], b=CHINESE[2])
    rows[3]["a"] = LONG
    rows[4]["b_media"] = "clips/p5 b.png"
    (folder / "clips").mkdir()
    (folder / "clips" / "p5 b.png").write_bytes(PNG)
    return rows


class Page:
    """The labelling page as a person sees it, through Selenium."""

    def __init__(self, driver, url: str) -> None:
        self.driver, self.url = driver, url

    def js(self, script: str):
        return self.driver.execute_script(script)

    def wait_for(self, id: str, labelled: int) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        def ready(_) -> bool:
            return self.js("const pair = document.getElementById('pair'); "
                           "return [pair.dataset.id, document.getElementById('progress').textContent, "
                           "document.getElementById('choose-left').disabled]") == [id, f"{labelled} of 8 labelled",
                                                                                  False]
        WebDriverWait(self.driver, 30).until(ready, message=f"the page did not show pair {id} ({labelled} labelled)")

    def panel(self, position: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, position)

    def side(self, position: str) -> str:
        """Which side of the candidate ("a"/"b") is shown at a screen position ("left"/"right")."""
        return self.panel(position).get_attribute("data-side")

    def text(self, side: str) -> str:
        """The text shown for a candidate side, as the page holds it (textContent)."""
        position = "left" if self.side("left") == side else "right"
        return self.js(f"return document.querySelector('#{position} .text').textContent")

    def click(self, button_id: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.ID, button_id).click()

    def key(self, key: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).send_keys(key).perform()


@pytest.mark.slow
def test_browser_labelling_survives_a_sigkill_and_the_labels_train_a_reward_model(tmp_path, browser, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    rows = candidates_for_the_page(tmp_path)
    candidates = write_candidates(tmp_path / "candidates.jsonl", rows)
    labels, port = tmp_path / "labels.jsonl", free_port()
    server = ServerProcess(candidates, labels, port)
    page = Page(browser, server.url)
    expected: list[tuple[str, str, str]] = []  # (id, choice, reason) as given
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "annotator").send_keys("ana", Keys.ENTER)
        page.wait_for("p1", 0)
        assert "A" in browser.find_element(By.CSS_SELECTOR, "#choose-left kbd").text  # shortcuts on the page
        assert "Keys:" in browser.find_element(By.CLASS_NAME, "keys").text

        expected.append(("p1", page.side("left"), ""))
        page.click("choose-left")  # a click
        page.wait_for("p2", 1)
        # the <script> response is shown as its characters and never runs
        assert page.text("b") == SCRIPT and "<script>" in page.panel("left" if page.side("left") == "b"
                                                                      else "right").text
        assert page.js("return window.pwned") is None and browser.title == "Compare two responses"
        expected.append(("p2", page.side("right"), ""))
        page.key("b")  # a key
        page.wait_for("p3", 2)
        assert page.js("return document.getElementById('prompt-text').textContent") == CHINESE[0]
        assert page.text("a") == CHINESE[1] and page.text("b") == CHINESE[2]
        expected.append(("p3", "tie", ""))
        page.click("choose-tie")
        page.wait_for("p4", 3)
        long_box = "#" + ("left" if page.side("left") == "a" else "right") + " .text"
        assert page.js(f"const box = document.querySelector('{long_box}'); "
                       "return box.scrollHeight > box.clientHeight && getComputedStyle(box).overflowY === 'auto'")
        browser.find_element(By.ID, "reason").send_keys("both ramble", Keys.ESCAPE)
        expected.append(("p4", "both_bad", "both ramble"))
        page.key("x")
        page.wait_for("p5", 4)
        shown = "#" + ("left" if page.side("left") == "b" else "right") + " img"
        assert page.js(f"const img = document.querySelector('{shown}'); return [img.hidden, img.naturalWidth]") \
            == [False, 1]  # the media file, loaded through the server
        page.key("s")  # skip ...
        page.wait_for("p6", 5)
        page.key("u")  # ... and undo it: the page goes back to p5
        page.wait_for("p5", 4)
        assert "Undone: your label of p5" in browser.find_element(By.ID, "status").text
        expected.append(("p5", page.side("left"), ""))
        page.click("choose-left")
        page.wait_for("p6", 5)

        server.kill()  # SIGKILL while the page waits on p6
        page.key("a")
        WebDriverWait(browser, 30).until(lambda _: "Not saved" in browser.find_element(By.ID, "status").text)
        assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
        server = ServerProcess(candidates, labels, port)
        browser.refresh()  # the page remembers the name and asks the restarted server where to resume
        page.wait_for("p6", 5)
        expected.append(("p6", page.side("left"), ""))
        page.key("a")
        page.wait_for("p7", 6)
        expected.append(("p7", page.side("right"), ""))
        page.click("choose-right")
        page.wait_for("p8", 7)
    finally:
        server.stop()

    given = [(label.id, label.choice, label.reason) for label in read_labels(labels)]
    assert given == expected
    records = [json.loads(line) for line in labels.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 9 and sum(r.get("undo", False) for r in records) == 1  # 8 labels, one undone
    assert all(r["annotator"] == "ana" and r["seconds"] > 0 for r in records if not r.get("undo"))

    prefs = tmp_path / "prefs.jsonl"
    done = feedback_cli("export", str(labels), "--candidates", str(candidates), "--out", str(prefs))
    assert done.returncode == 0 and done.stdout.startswith(f"wrote 5 preference pairs to {prefs}"), done.stderr
    by_id = {row["id"]: row for row in rows}
    wanted = [(id, by_id[id][choice]) for id, choice, _ in expected if choice in ("a", "b")]
    assert [(row["id"], row["chosen"]) for row in map(json.loads, prefs.read_text().splitlines())] == wanted

    run = tmp_path / "rm"
    trained = train_cli(["stage=rm", "data=jsonl", f"data.path={prefs}", "trainer.max_steps=4",
                         "stage.datamodule.batch_size=2", "trainer.val_check_interval=4", f"hydra.run.dir={run}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    record = json.loads((run / "metrics.json").read_text())
    assert record["data"]["train/format"] == "explicit" and (run / "export" / "score_head.safetensors").is_file()

    # in this process, which has torch imported already (the CLI's argument handling is tested elsewhere)
    capsys.readouterr()
    assert feedback_main(["stats", str(labels), "--candidates", str(candidates), "--reward-model",
                          str(run / "export"), "--json"]) == 0
    (ana,) = json.loads(capsys.readouterr().out)["annotators"]
    from lightrlhf.models.reward import RewardModel

    model = RewardModel.from_pretrained(run / "export")
    agree = []
    for id, choice, _ in expected:
        if choice in ("a", "b"):
            score_a, score_b = model.score([by_id[id]["prompt"]] * 2, [by_id[id]["a"], by_id[id]["b"]]).tolist()
            agree.append(0.5 if score_a == score_b else float((score_a > score_b) == (choice == "a")))
    assert ana["reward_model_pairs"] == 5 and ana["reward_model_agreement"] == pytest.approx(sum(agree) / 5)
    assert ana["choices"] == {"a": sum(c == "a" for _, c, _ in expected), "b": sum(c == "b" for _, c, _ in expected),
                              "tie": 1, "both_bad": 1, "skip": 0}

"""The README's picture of the labelling page: python tests/feedback/make_screenshot.py docs/feedback-page.png

Serves twelve demo pairs, labels three of them in a headless Chromium as a person would, and saves
the page showing the fourth. Needs chromium and chromium-driver (see .ci/run).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from feedback_support import chromium_paths, demo_candidates, headless_chromium, write_candidates
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from lightrlhf.feedback.client import FeedbackClient
from lightrlhf.feedback.server import serve_in_thread


def main(out: Path) -> None:
    paths = chromium_paths()
    if paths is None:
        sys.exit("error: install chromium and chromium-driver first")
    with tempfile.TemporaryDirectory() as folder:
        rows = demo_candidates(12)
        rows[3].update(prompt="describe star moon :", a="moon .",
                       b="the moon is high and the star is bright over the calm lake , thanks .")
        candidates = write_candidates(Path(folder) / "candidates.jsonl", rows)
        with serve_in_thread(candidates, Path(folder) / "labels.jsonl") as url:
            client = FeedbackClient(url)
            for row, choice in zip(rows[:3], ("a", "b", "tie")):
                client.label(row["id"], "ana", choice, seconds=4.0)
            driver = headless_chromium(*paths, width=1200, height=700)
            try:
                driver.get(url + "/")
                driver.find_element(By.ID, "annotator").send_keys("ana", Keys.ENTER)
                WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "pair").get_attribute("data-id")
                                                == rows[3]["id"])
                driver.find_element(By.ID, "reason").send_keys("answers the request, in full")
                driver.find_element(By.ID, "status").click()  # the text box loses the caret
                driver.save_screenshot(str(out))
            finally:
                driver.quit()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/feedback-page.png"))

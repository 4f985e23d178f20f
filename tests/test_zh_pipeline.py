"""Chinese text through a run: a data path in Chinese, TensorBoard's sample tables, and the JSON files
a person reads (run.json, metrics.json, the export's lightrlhf.json), UTF-8 whatever the locale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_in_process, shared, train_cli

from lightrlhf.demo.language_zh import is_chinese
from lightrlhf.demo.task import DemoTask


def table_rows(run_dir: Path, tag: str) -> list[list[str]]:
    """The cells of the newest markdown table logged under `tag` (header and separator left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    (name,) = [t for t in events.Tags()["tensors"] if t.startswith(tag + "/")]
    text = events.Tensors(name)[-1].tensor_proto.string_val[0].decode("utf-8")  # TensorBoard keeps UTF-8 bytes
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in text.splitlines()[2:]]


@pytest.fixture(scope="module")
def chinese_sft_run(tmp_path_factory):
    """SFT of model=tiny_zh on 200 rows of the Chinese demo from a directory named in Chinese."""
    def make(root):
        task = DemoTask(cache_dir=str(root / "cache"), sft_size=200, language="zh")
        rows = Path(task.materialize("sft", "train")).read_text(encoding="utf-8")
        data = root / "中文数据" / "问答.jsonl"
        data.parent.mkdir(parents=True)
        data.write_text(rows, encoding="utf-8")
        run_in_process(["stage=sft", "model=tiny_zh", "data=jsonl", f'data.path="{data}"', "trainer.max_steps=2",
                        "stage.datamodule.batch_size=8", "stage.eval.num_prompts=4", "stage.eval.num_logged=4",
                        "stage.generation.max_new_tokens=12", "trainer.val_check_interval=2"], root / "run")

    root = shared(tmp_path_factory, "chinese_sft_run", make)
    return root / "run", root / "中文数据" / "问答.jsonl"


@pytest.mark.slow
def test_the_sample_table_in_tensorboard_holds_the_chinese_prompts_and_completions(chinese_sft_run):
    run_dir, data = chinese_sft_run
    prompts = {json.loads(line)["prompt"] for line in data.read_text(encoding="utf-8").splitlines()}
    rows = table_rows(run_dir, "samples")
    assert len(rows) == 4
    for prompt, completion in rows:
        assert prompt in prompts and is_chinese(prompt)  # the held-out prompt, character for character
        assert "\ufffd" not in completion and (completion == "" or is_chinese(completion))
    summary = dict(table_rows(run_dir, "data"))
    assert summary["train/format"] == "prompt_completion"


@pytest.mark.slow
def test_the_files_a_person_reads_keep_the_chinese_path_as_written(chinese_sft_run):
    run_dir, data = chinese_sft_run
    for name in ("run.json", "metrics.json", "export/lightrlhf.json"):
        text = (run_dir / name).read_bytes().decode("utf-8")
        assert "\\u" not in text, name
    assert str(data) in (run_dir / "export" / "lightrlhf.json").read_text(encoding="utf-8")
    assert f'data.path="{data}"' in json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["overrides"]
    # read back by a process whose locale is ASCII (LC_ALL=C, no UTF-8 mode), as a Windows cp936 one would differ
    script = ("import json, sys; from pathlib import Path; from lightrlhf.launch.record import read_record; "
              "from lightrlhf.models.loading import read_export_manifest; "
              "print(json.dumps([read_record(Path(sys.argv[1]))['overrides'], "
              "read_export_manifest(Path(sys.argv[1]) / 'export')['config']['data']['path']]))")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", script, str(run_dir)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    overrides, path = json.loads(done.stdout)
    assert f'data.path="{data}"' in overrides and path == str(data)


@pytest.mark.slow
def test_an_unquoted_chinese_path_is_one_line_that_says_to_quote_it(tmp_path):
    done = train_cli(["stage=sft", "data=jsonl", f"data.path={tmp_path}/数据/偏好.jsonl",
                      f"hydra.run.dir={tmp_path / 'run'}"])
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: config: ") and line.endswith(
        """; a value with characters outside ASCII (a path in Chinese, say) must be quoted: """
        """'data.path="/数据/偏好.jsonl"'""")

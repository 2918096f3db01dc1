"""Scans: model lists, failures recorded, resumption after kills, Ray and worker pools, the report."""
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from datetime import date

import pandas as pd
import pytest

from neurolang.cli import main
from neurolang.errors import NeurolangError
from neurolang.report import correlations
from neurolang.scan import ScanOptions, read_models, read_table, scan, worker_gpus

FAST = ["--max-sentences", "12", "--eval-sentences", "4", "--tau", "0.5", "--ratio", "0.05"]
OPTIONS = ScanOptions(langs=("en", "zh", "fr"), max_sentences=12, eval_sentences=4, tau=0.5, ratio=0.05)
VOLATILE = ("seconds_", "detect_tokens_per_second")  # wall times differ from run to run


def stable(table: pd.DataFrame) -> pd.DataFrame:
    return table[[c for c in table.columns if not c.startswith(VOLATILE)]]


def test_read_models_from_a_list_csv_and_yaml(tmp_path):
    entries = read_models("tiny:llama, /some/where/SmolLM2-135M.Q4_1.gguf ,Qwen/Qwen2.5-0.5B")
    assert [e.name for e in entries] == ["tiny-llama", "SmolLM2-135M.Q4_1", "Qwen__Qwen2.5-0.5B"]
    (tmp_path / "models.csv").write_text("name,path,family,size,release_date\n"
                                         "a,tiny:llama,llama,1M,2024-01-01\nb,tiny:qwen2,qwen2,,2024-06-01\n")
    csv_entries = read_models(str(tmp_path / "models.csv"))
    assert [(e.name, e.path, e.release_date) for e in csv_entries] == [("a", "tiny:llama", "2024-01-01"),
                                                                       ("b", "tiny:qwen2", "2024-06-01")]
    (tmp_path / "models.yaml").write_text("models:\n  - {name: a, path: 'tiny:llama', size: 1M}\n  - path: 'tiny:gemma'\n")
    assert [e.name for e in read_models(str(tmp_path / "models.yaml"))] == ["a", "tiny-gemma"]
    with pytest.raises(NeurolangError, match="share the name"):
        read_models("tiny:llama,tiny:llama")
    with pytest.raises(NeurolangError, match="no such models file"):
        read_models(str(tmp_path / "absent.yaml"))
    (tmp_path / "stages.csv").write_text('name,path,layer_stages\na,tiny:llama,"0-0,1-1,2-2"\nb,tiny:qwen2,0-1\n')
    with pytest.raises(NeurolangError, match="model b: layer stages are three ranges"):
        read_models(str(tmp_path / "stages.csv"))


def test_the_papers_models(tmp_path):
    entries = read_models("paper")
    # §3.1's list: 20 models of the Llama, Qwen and Gemma families.
    assert len(entries) == 20 and {e.family for e in entries} == {"Llama", "Qwen", "Gemma"}
    assert [e.name for e in entries if e.family == "Gemma"] == ["Gemma-7B", "Gemma2-9B", "Gemma3-4B"]
    dates = [date.fromisoformat(e.release_date) for e in entries]
    assert min(dates) == date(2023, 2, 24) and max(dates) == date(2025, 3, 12)
    assert all(e.path.count("/") == 1 and e.size.endswith("B") for e in entries)  # hub ids and sizes
    # Tables 3 and 5 give their own layer stages for three models; the others take thirds.
    assert {e.name: e.layer_stages for e in entries if e.layer_stages} == {
        "Llama-3.1-8B": "0-7,8-23,24-31", "Qwen2.5-3B": "0-5,6-29,30-35", "Gemma2-9B": "0-5,6-34,35-41"}


def test_layer_stages_of_a_models_file(tmp_path):
    """A model's layer_stages classify it; changing them redoes the classify stage alone."""
    from transformers import AutoModelForCausalLM

    from neurolang.tiny import CONFIGS, byte_tokenizer, random_weights_

    config = CONFIGS["llama"]()
    config.num_hidden_layers = 4  # four layers: stages other than thirds exist
    random_weights_(AutoModelForCausalLM.from_config(config)).save_pretrained(tmp_path / "four")
    byte_tokenizer().save_pretrained(tmp_path / "four")
    models, run = tmp_path / "models.csv", tmp_path / "run"
    models.write_text(f'name,path,layer_stages\nfour,{tmp_path / "four"},"0-0,1-2,3-3"\n')
    assert scan(read_models(str(models)), run, OPTIONS, log=lambda m: None)[0]["status"] == "done"
    stats = json.loads((run / "four" / "stats.json").read_text())
    assert stats["layers"]["stage_bounds"] == {"early": [0, 0], "middle": [1, 2], "late": [3, 3]}
    scored = (run / "four" / "scores.json").stat().st_mtime_ns
    models.write_text(f"name,path,layer_stages\nfour,{tmp_path / 'four'},\n")  # none: thirds
    logged = []
    assert scan(read_models(str(models)), run, OPTIONS, log=logged.append)[0]["status"] == "done"
    assert logged == ["four: classify"] and (run / "four" / "scores.json").stat().st_mtime_ns == scored
    stats = json.loads((run / "four" / "stats.json").read_text())
    assert stats["layers"]["stage_bounds"] == {"early": [0, 1], "middle": [2, 2], "late": [3, 3]}


def test_scan_records_failures_and_never_redoes_a_stage(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert"}')
    entries = read_models(f"tiny:llama,{broken},tiny:qwen3")
    statuses = scan(entries, tmp_path / "run", OPTIONS, log=lambda m: None)
    assert [s["status"] for s in statuses] == ["done", "error", "done"]
    assert "unsupported architecture 'bert'" in statuses[1]["message"]
    table = read_table(tmp_path / "run")
    assert list(table["model"]) == ["tiny-llama", "broken", "tiny-qwen3"]
    assert list(table["status"]) == ["done", "error", "done"] and table["las"].notna().sum() >= 1
    error = json.loads((tmp_path / "run" / "broken" / "error.json").read_text())
    assert error["stage"] == "load" and len(error["message"].splitlines()) == 1
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "tiny-llama").iterdir()}
    again = scan(entries, tmp_path / "run", OPTIONS, log=lambda m: None)
    assert [s["status"] for s in again] == ["done", "error", "done"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "tiny-llama").iterdir()} == stamps
    pd.testing.assert_frame_equal(read_table(tmp_path / "run"), table)


def test_eval_added_to_a_finished_scan_runs_only_the_eval_stage(tmp_path):
    data = tmp_path / "mgsm"
    data.mkdir()
    for lang in ("zh", "fr"):  # MGSM's TSV form: question, tab, answer
        (data / f"mgsm_{lang}.tsv").write_text("".join(f"{lang} {n} + 2 = ?\t{n + 2}\n" for n in range(3)))
    entries, run = read_models("tiny:llama"), tmp_path / "run"
    scan(entries, run, OPTIONS, log=lambda m: None)
    kept = [f for f in (run / "tiny-llama").iterdir() if f.name not in ("timings.json", "eval")]
    stamps = {f: f.stat().st_mtime_ns for f in kept}
    logged = []
    with_eval = dataclasses.replace(OPTIONS, eval_task="mgsm", eval_data=str(data), eval_limit=2)
    assert [s["status"] for s in scan(entries, run, with_eval, log=logged.append)] == ["done"]
    assert logged == ["tiny-llama: eval"] and {f: f.stat().st_mtime_ns for f in kept} == stamps
    results = json.loads((run / "tiny-llama" / "eval" / "mgsm" / "results.json").read_text())
    assert {lang: info["items"] for lang, info in results["per_language"].items()} == {"zh": 2, "fr": 2}
    row = read_table(run).iloc[0]
    assert row["acc_mgsm_avg"] == pytest.approx((row["acc_mgsm_zh"] + row["acc_mgsm_fr"]) / 2)
    assert all(0 <= row[f"acc_mgsm_{lang}"] <= 100 for lang in ("zh", "fr")) and row["seconds_eval"] > 0
    logged.clear()  # other items asked for: the eval stage alone is redone
    assert scan(entries, run, dataclasses.replace(with_eval, eval_limit=3), log=logged.append)[0]["status"] == "done"
    assert logged == ["tiny-llama: eval"] and {f: f.stat().st_mtime_ns for f in kept} == stamps
    results = json.loads((run / "tiny-llama" / "eval" / "mgsm" / "results.json").read_text())
    assert {lang: info["items"] for lang, info in results["per_language"].items()} == {"zh": 3, "fr": 3}


def test_mmmlu_in_a_scan_leaves_out_thai(tmp_path):
    """OpenAI's MMMLU has no Thai: a scan of en, zh, th evaluates zh alone, and one of en, th is refused."""
    data = tmp_path / "mmmlu"
    data.mkdir()
    rows = ["Question,A,B,C,D,Answer,Subject"] + [f"q{n}?,a,b,c,d,{'ABCD'[n % 4]},virology" for n in range(4)]
    (data / "mmlu_ZH_CN.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    options = dataclasses.replace(OPTIONS, langs=("en", "zh", "th"), eval_task="mmmlu", eval_data=str(data),
                                  eval_limit=2)
    assert options.eval_langs() == ["zh"]
    assert scan(read_models("tiny:llama"), tmp_path / "run", options, log=lambda m: None)[0]["status"] == "done"
    results = json.loads((tmp_path / "run" / "tiny-llama" / "eval" / "mmmlu" / "results.json").read_text())
    assert results["langs"] == ["zh"] and results["per_language"]["zh"]["items"] == 2
    with pytest.raises(NeurolangError, match="--eval mmmlu has none of the languages en, th"):
        dataclasses.replace(options, langs=("en", "th"))


def test_a_run_keeps_one_set_of_result_options(tmp_path):
    entries, run = read_models("tiny:llama"), tmp_path / "run"
    scan(entries, run, OPTIONS, log=lambda m: None)
    for changed, message in ((dict(ratio=0.1), "--ratio 0.05, not 0.1"), (dict(langs=("en", "fr")), "--langs en,zh,fr"),
                             (dict(max_sentences=20), "--max-sentences 12, not 20")):
        with pytest.raises(NeurolangError, match=f"was scanned with {message}"):
            scan(entries, run, dataclasses.replace(OPTIONS, **changed), log=lambda m: None)
    logged = []  # options that change no result (batch size, backend, device) are free
    assert scan(entries, run, dataclasses.replace(OPTIONS, batch_size=3), log=logged.append)[0]["status"] == "done"
    assert logged == []


def _scan_command(run_dir):
    return [sys.executable, "-m", "neurolang.cli", "scan", "--models", "tiny:llama,tiny:gemma2", "--langs", "en,zh,fr",
            "--out", str(run_dir), "--no-report", *FAST]


def _scan_killed_inside_a_stage(run_dir, env, rng) -> bool:
    """Start a scan and SIGKILL it a moment after it announces its 1st, 2nd or 3rd stage (chosen by rng).

    The kill follows the scan's own progress lines, not the clock, so it lands inside the stages
    however fast this machine imports or computes. Returns whether the scan was still running.
    """
    proc = subprocess.Popen(_scan_command(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    wanted, seen = rng.randint(1, 3), 0
    for line in proc.stderr:
        seen += bool(re.fullmatch(r"tiny-\S+: (verify|detect|classify|score)", line.strip()))
        if seen == wanted:
            time.sleep(rng.uniform(0.0, 0.3))
            break
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return killed


def test_killed_scans_resume_to_the_uninterrupted_table(tmp_path):
    env = {**os.environ, "NEUROLANG_COMPILE": "0"}
    subprocess.run(_scan_command(tmp_path / "straight"), check=True, capture_output=True, env=env, timeout=600)
    expected = read_table(tmp_path / "straight")
    rng = random.Random(7)
    kills = sum(_scan_killed_inside_a_stage(tmp_path / "killed", env, rng) for _ in range(4))
    assert kills >= 2
    subprocess.run(_scan_command(tmp_path / "killed"), check=True, capture_output=True, env=env, timeout=600)
    got = read_table(tmp_path / "killed")
    pd.testing.assert_frame_equal(stable(got), stable(expected))
    assert got["model"].is_unique and len(got) == 2
    assert not list((tmp_path / "killed").rglob("*.partial"))
    assert not list((tmp_path / "killed").rglob("detect-progress"))  # a finished detection removes its languages
    for model in ("tiny-llama", "tiny-gemma2"):
        for name in ("neurons.safetensors", "classes.safetensors"):
            assert (tmp_path / "killed" / model / name).read_bytes() == (tmp_path / "straight" / model / name).read_bytes()


def test_scan_on_two_workers_and_on_local_ray(tmp_path):
    entries = read_models("tiny:llama,tiny:mistral")
    scan(entries, tmp_path / "pool", OPTIONS, workers=2)
    pooled = read_table(tmp_path / "pool")
    assert list(pooled["status"]) == ["done", "done"]
    pytest.importorskip("ray")
    scan(entries, tmp_path / "ray", OPTIONS, ray_address="local")
    pd.testing.assert_frame_equal(stable(read_table(tmp_path / "ray")), stable(pooled))


def test_scan_exits_1_when_a_model_failed(tmp_path, capsys):
    assert main(["scan", "--models", f"tiny:llama,{tmp_path / 'absent'}", "--langs", "en,fr", "--out",
                 str(tmp_path / "run"), "--no-report", *FAST]) == 1
    assert "1 of 2 models done" in capsys.readouterr().out
    assert read_table(tmp_path / "run")["status"].tolist() == ["done", "error"]


def test_workers_take_the_gpus_this_process_sees(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_gpus(2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6,7")  # the user's choice, kept
    assert worker_gpus(3) == ["4", "6", "7"]
    with pytest.raises(NeurolangError, match="--workers 4, but this machine shows 3 GPU"):
        worker_gpus(4)
    assert worker_gpus(4, "cpu") == [""] * 4  # CPU workers: as many as asked, none sees a GPU
    with pytest.raises(NeurolangError, match="--device cuda:1 cannot be with --workers"):
        scan(read_models("tiny:llama,tiny:qwen2"), tmp_path, dataclasses.replace(OPTIONS, device="cuda:1"), workers=2)
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_report_writes_figures_tables_and_correlations(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "models.csv").write_text("name,path,release_date\nold,tiny:llama,2023-02-01\n"
                                         "mid,tiny:qwen2,2024-01-15\nnew,tiny:gemma3_text,2025-03-01\n")
    assert main(["scan", "--models", str(tmp_path / "models.csv"), "--langs", "en,zh,fr", "--out",
                 str(tmp_path / "run"), *FAST]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 models done" in out and "index.html" in out
    report = tmp_path / "run" / "report"
    for name in ("fig1_vs_release_date.png", "fig2_fractions.png", "fig4_delta_ppl.png", "fig6_layers.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    text = (report / "report.md").read_text()
    table = read_table(tmp_path / "run")  # LAS with its bootstrap interval, where it is defined
    las = table.dropna(subset=["las"])
    assert len(las) and (las["las_low"] <= las["las_high"]).all() and "las_low" in text
    assert "Tables 2, 6" in text and "Tables 3, 5" in text and "Table 4" in text and "release date" in text and "| old |" in text.replace("| old  |", "| old |")
    assert "<img src='fig2_fractions.png'" in (report / "index.html").read_text()


def test_correlations():
    c = correlations([1, 2, 3, 4], [1.0, 4.0, 9.0, 16.0])
    assert c["spearman"] == pytest.approx(1.0) and 0.95 < c["pearson"] < 1.0
    assert correlations([1, 2], [3, 4]) is None and correlations([1, None, 3], [1, 2, 3]) is None


def test_scan_errors_are_one_line(tmp_path, capsys):
    assert main(["scan", "--models", str(tmp_path / "none.csv"), "--out", str(tmp_path / "r")]) == 2
    assert main(["scan", "--models", "tiny:llama", "--eval", "mgsm", "--out", str(tmp_path / "r")]) == 2
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert main(["scan", "--models", "", "--out", str(tmp_path / "r")]) == 2  # not the demo model
    for bad in (["--ratio", "2"], ["--eval-sentences", "-1"], ["--backend", "cobol"], ["--dtype", "float8"],
                ["--eval", "mgsm", "--eval-data", str(tmp_path / "none")],
                ["--eval", "mgsm", "--eval-data", str(tmp_path), "--eval-limit", "0"]):
        assert main(["scan", "--models", "tiny:llama", "--out", str(tmp_path / "r"), *bad]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and all(line.startswith("neurolang: error:") for line in lines)
    assert not (tmp_path / "r").exists()  # refused before any model ran

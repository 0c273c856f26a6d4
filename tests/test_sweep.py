"""`domainlm sweep` on tiny models, the bootstrap test, and `domainlm report`."""

import json
import shutil

import numpy as np
import pytest
import yaml

from domainlm.cli import main
from domainlm.sweep.stats import paired_bootstrap
from tests.test_classify import make_rows, write_jsonl


def test_bootstrap_identical_is_not_significant_and_clearly_better_is():
    rng = np.random.default_rng(0)
    base = (rng.random(300) < 0.7).astype(float)
    same = paired_bootstrap(base, base)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    better = base.copy()
    better[np.flatnonzero(base == 0)[:45]] = 1.0  # +15 points on the same rows
    result = paired_bootstrap(better, base)
    assert result["p_value"] < 0.01 and result["ci95"][0] > 0
    slightly = base.copy()
    slightly[np.flatnonzero(base == 0)[:2]] = 1.0  # +0.7 points: noise on 300 rows
    assert paired_bootstrap(slightly, base)["p_value"] > 0.05
    with pytest.raises(ValueError):
        paired_bootstrap(base, base[:10])


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, corpus_dir, tiny_model):
    out = tmp_path_factory.mktemp("pt") / "run"
    assert main(["pretrain", "--corpus", corpus_dir, "--model", tiny_model, "--out", str(out), "--max-seq-len", "48",
                 "--micro-batch-size", "4", "--max-steps", "4", "--save-steps", "2", "--num-workers", "0",
                 "--no-tensorboard", "--logging-freq", "1"]) == 0
    return out


def test_sweep_table_resume_and_failed_cell(tmp_path, tiny_model, pretrain_run, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(20, 1))
    test = write_jsonl(tmp_path / "test.jsonl", make_rows(10, 2))
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(pretrain_run / "step-000002" / "config.json", broken)  # a config without weights
    spec = {"out": str(tmp_path / "sweep"), "seeds": [1, 2], "metrics": ["accuracy", "tolerant_accuracy@2"],
            "models": [{"name": "tiny", "base": tiny_model, "snapshots": str(pretrain_run)},
                       {"name": "broken", "base": str(broken)}],
            "finetune": {"train": train, "test": test, "epochs": 2, "learning_rate": 2e-3, "batch_size": 16, "max_seq_len": 32}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path)]) == 0
    root = tmp_path / "sweep"
    results = json.loads((root / "results.json").read_text())["cells"]
    tiny = {r["step"]: r for r in results if r["model"] == "tiny"}
    assert sorted(tiny) == [0, 2, 4]
    for step, r in tiny.items():  # each table value is the mean over the seeds' cells
        folder = "base" if step == 0 else f"step-{step:06d}"
        accs = [json.loads((root / "cells" / "tiny" / folder / f"seed-{s}" / "metrics.json").read_text())["test"]["accuracy"] for s in (1, 2)]
        assert r["accuracy"]["mean"] == pytest.approx(np.mean(accs)) and r["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
        assert ("vs_base" in r) == (step != 0)
    assert sum(bool(r.get("best")) for r in results) == 1
    table = (root / "table.md").read_text()
    assert "| model | base | step 2 | step 4 |" in table and "★" in table and "| broken | failed |" in table
    failures = json.loads((root / "failures.json").read_text())
    assert [f["cell"] for f in failures] == ["broken/base/seed-1", "broken/base/seed-2"]
    assert "no weights" in failures[0]["error"]
    rows = (root / "table.csv").read_text().splitlines()
    assert rows[0].startswith("model,checkpoint,step,accuracy_mean") and len(rows) == 5
    for name in ("report.html", "metric_vs_step.png", "pretraining_loss.png"):
        assert (root / name).stat().st_size > 1000, name
    assert "data:image/png;base64," in (root / "report.html").read_text()
    # resume: finished cells are not run again; a crashed one is
    done = root / "cells" / "tiny" / "step-000002" / "seed-1"
    stamp = (done / "metrics.json").stat().st_mtime_ns
    crashed = root / "cells" / "tiny" / "step-000004" / "seed-2"
    (crashed / "DONE").unlink()
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 0
    assert (done / "metrics.json").stat().st_mtime_ns == stamp
    assert (crashed / "DONE").is_file() and (crashed / "metrics.json").stat().st_mtime_ns > stamp
    # changed fine-tuning options make finished cells outdated
    spec["finetune"]["epochs"] = 1
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path)]) == 0
    assert "options changed since it ran" in capsys.readouterr().err
    assert yaml.safe_load((done / "config.yaml").read_text())["epochs"] == 1


def test_report_for_pretrain_and_finetune_runs(tmp_path, pretrain_run, tiny_model, capsys):
    assert main(["report", str(pretrain_run), "--out", str(tmp_path / "r1")]) == 0
    assert (tmp_path / "r1" / "curve_mlm_loss.png").stat().st_size > 1000
    assert "results.json" in (tmp_path / "r1" / "report.md").read_text()
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(10, 1))
    ft = tmp_path / "ft"
    assert main(["finetune", "--model", tiny_model, "--train", train, "--out", str(ft), "--epochs", "1", "--max-seq-len", "32"]) == 0
    assert main(["report", str(ft)]) == 0
    assert "metrics.json" in (ft / "report.html").read_text()
    assert main(["report", str(tmp_path)]) == 2
    assert "has no log.jsonl" in capsys.readouterr().err

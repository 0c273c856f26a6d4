"""`domainlm sweep` on tiny models: the table with the floor and adjusted p-values, resume, failures, bad inputs
caught before any work, the pretrain section, device planning; the conclusion on constructed cells;
`domainlm report`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from domainlm import outputs
from domainlm.cli import main
from domainlm.errors import DomainLMError
from domainlm.stats import holm
from domainlm.sweep.command import Cell, SweepConfig, device_plan, remove_inside
from domainlm.sweep.summary import summarize
from tests.test_classify import make_rows, write_jsonl


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, corpus_dir, tiny_model):
    out = tmp_path_factory.mktemp("pt") / "run"
    assert (
        main(
            [
                "pretrain",
                "--corpus",
                corpus_dir,
                "--model",
                tiny_model,
                "--out",
                str(out),
                "--max-seq-len",
                "48",
                "--batch-size",
                "4",
                "--max-steps",
                "4",
                "--save-steps",
                "2",
                "--num-workers",
                "0",
                "--no-tensorboard",
                "--logging-freq",
                "1",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    return {
        "train": write_jsonl(root / "train.jsonl", make_rows(20, 1)),
        "test": write_jsonl(root / "test.jsonl", make_rows(10, 2)),
    }


FT = {"epochs": 2, "learning_rate": 2e-3, "batch_size": 16, "max_seq_len": 32}


def test_sweep_table_floor_resume_and_failed_cell(tmp_path, tiny_model, pretrain_run, task_files, capsys):
    broken = tmp_path / "broken"  # passes every check before the cells (a config, a tokenizer, a weights file) ...
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # ... but its weights are cut: its cells fail, the others run
    spec = {
        "out": str(tmp_path / "sweep"),
        "seeds": [1, 2],
        "metrics": ["accuracy", "tolerant_accuracy@2"],
        "models": [
            {"name": "tiny", "base": tiny_model, "snapshots": str(pretrain_run)},
            {"name": "broken", "base": str(broken)},
        ],
        "finetune": {**task_files, **FT, "group_column": "group"},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path)]) == 2  # cells failed: the table is written, the status says so
    assert "2 of 8 cells failed" in capsys.readouterr().err
    root = tmp_path / "sweep"
    saved = json.loads((root / "results.json").read_text())
    tiny = {r["step"]: r for r in saved["cells"] if r["model"] == "tiny"}
    assert sorted(tiny) == [0, 2, 4]
    for step, r in tiny.items():  # each table value is the mean over the seeds' cells
        folder = "base" if step == 0 else f"step-{step:06d}"
        accs = [
            json.loads((root / "cells" / "tiny" / folder / f"seed-{s}" / "metrics.json").read_text())["test"][
                "accuracy"
            ]
            for s in (1, 2)
        ]
        assert r["values"]["accuracy"] == pytest.approx(accs)
        assert r["accuracy"]["mean"] == pytest.approx(np.mean(accs)) and r["accuracy"]["std"] == pytest.approx(
            np.std(accs, ddof=1)
        )
        assert ("vs_base" in r) == (step != 0)
    raw = [tiny[s]["vs_base"]["p_value"] for s in (2, 4)]
    assert [tiny[s]["vs_base"]["p_holm"] for s in (2, 4)] == pytest.approx(holm(raw).tolist())
    assert sum(bool(r.get("best")) for r in saved["cells"]) == 1
    floor = json.loads((root / "floor" / "metrics.json").read_text())
    assert (
        saved["floor"]["test"]["accuracy"] == floor["test"]["accuracy"] and floor["train_rows"] == 48
    )  # 60 rows less a fifth
    table = (root / "table.md").read_text()
    lines = table.splitlines()
    assert lines[2].startswith("**") and saved["conclusion"] in lines[2]
    assert (
        "| model | checkpoint | accuracy mean ± std | per seed | tolerant_accuracy@2 | Δ vs base | p | p (Holm) |"
        in table
    )
    assert f"| floor | {floor['method']} | {100 * floor['test']['accuracy']:.1f} |" in table
    assert "| broken | base | failed |" in table and "test.jsonl (30 rows)" in table
    failures = json.loads((root / "failures.json").read_text())
    assert [f["cell"] for f in failures] == [
        "broken/base/seed-1",
        "broken/base/seed-2",
    ] and "damaged or truncated" in failures[0]["error"]
    rows = (root / "table.csv").read_text().splitlines()
    assert rows[0].startswith("model,checkpoint,step,accuracy_mean") and len(rows) == 1 + 4 + 1  # header, cells, floor
    for name in ("report.html", "metric_vs_step.png", "pretraining_loss.png"):
        assert (root / name).stat().st_size > 1000, name
    page = (root / "report.html").read_text()
    assert "class='lead'" in page and page.index("class='lead'") < page.index("<table>") and "tr class='floor'" in page
    # resume: finished cells and the floor are not run again; a crashed cell is
    done = root / "cells" / "tiny" / "step-000002" / "seed-1"
    stamp, floor_stamp = (
        (done / "metrics.json").stat().st_mtime_ns,
        (root / "floor" / "metrics.json").stat().st_mtime_ns,
    )
    crashed = root / "cells" / "tiny" / "step-000004" / "seed-2"
    (crashed / "DONE").unlink()
    spec["models"] = spec["models"][:1]
    spec["groups"] = True  # per-group columns: a table option, the cells stay valid
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path)]) == 0
    table = (root / "table.md").read_text()
    assert "| 质量验收 accuracy | 成本数据 accuracy |" in table.replace(
        "| 成本数据 accuracy | 质量验收 accuracy |", "| 质量验收 accuracy | 成本数据 accuracy |"
    )
    base = json.loads((root / "results.json").read_text())["cells"][0]
    groups = [
        json.loads((root / "cells" / "tiny" / "base" / f"seed-{s}" / "metrics.json").read_text())["test"]["per_group"]
        for s in (1, 2)
    ]
    assert base["per_group"]["成本数据"] == pytest.approx(np.mean([g["成本数据"]["accuracy"] for g in groups]))
    assert (done / "metrics.json").stat().st_mtime_ns == stamp and (
        root / "floor" / "metrics.json"
    ).stat().st_mtime_ns == floor_stamp
    assert (crashed / "DONE").is_file() and (crashed / "metrics.json").stat().st_mtime_ns > stamp
    # changed fine-tuning options make finished cells outdated
    spec["finetune"]["epochs"] = 1
    path.write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 0
    assert "options changed since it ran" in capsys.readouterr().err
    assert yaml.safe_load((done / "config.yaml").read_text())["epochs"] == 1


def _bad(spec: dict, key: str, value):
    spec = json.loads(json.dumps(spec))
    where, _, name = key.rpartition(".")
    target = spec
    for part in where.split(".") if where else []:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is DELETE:
        del target[name]
    else:
        target[name] = value
    return spec


DELETE = object()
BAD = [
    ("finetune.train", "missing.jsonl", "finetune: --train missing.jsonl does not exist"),
    ("models.0.steps", [999], "steps [999] have no snapshot (available: [2, 4])"),
    ("seeds", [], "seeds: needs at least one seed"),
    ("seeds", [1, 1], "seeds: [1, 1] repeats a seed"),
    ("seed", [1], "unknown option 'seed'"),
    ("models.0.snapshot", "x", "models[0]: unknown key 'snapshot'"),
    ("finetune.epoch", 2, "finetune: unknown option 'epoch'"),
    ("finetune.seeds", [1], "finetune: option 'seeds' is set by the sweep itself"),
    ("models.1.name", "tiny", "name 'tiny' is used twice"),
    ("models.0.name", "../up", "name '../up' becomes a folder name"),
    ("models.0.name", "a/b", "name 'a/b' becomes a folder name"),
    ("finetune.metric", "bogus", "--metric 'bogus' is not computed"),
    ("metrics", ["bogus"], "metrics: ['bogus'] not computed for a multiclass task"),
    ("finetune.valid_ratio", 0.1, "valid_ratio 0.1 holds out too few rows"),
    ("finetune.valid_max_rows", 5, "valid_max_rows 5 is under 20% of the 60 training rows"),
    ("finetune.test", DELETE, "give `test` (or `dev`)"),
    ("groups", True, "groups: true needs finetune.group_column"),
    ("models.1.base", "./no/such/model", "base ./no/such/model: no such folder"),
    ("models.1.snapshots", "no-such-run", "snapshots folder no-such-run does not exist"),
    (
        "models.0.pretrain",
        {"corpus": "nowhere", "max_steps": 4, "save_steps": 2},
        "pretrain: corpus nowhere is not a folder",
    ),
    ("models.0.pretrain", {"corpus": ".", "max_steps": 4}, "save_steps is needed"),
    (
        "models.0.pretrain",
        {"corpus": ".", "max_steps": 4, "save_steps": 2, "learning_rate": 5},
        "pretrain: --learning-rate = 5.0 is out of range",
    ),
    ("parallel", 0, "--parallel = 0 is out of range"),
]


@pytest.mark.parametrize(
    "key,value,message", BAD, ids=[f"{k}={'deleted' if v is DELETE else repr(v)}"[:40] for k, v, _ in BAD]
)
def test_sweep_bad_inputs_fail_before_any_work(
    tmp_path, tiny_model, pretrain_run, task_files, capsys, key, value, message
):
    spec = {
        "out": str(tmp_path / "sweep"),
        "seeds": [1, 2],
        "models": [
            {"name": "tiny", "base": tiny_model, "snapshots": str(pretrain_run)},
            {"name": "other", "base": tiny_model},
        ],
        "finetune": {**task_files, **FT},
    }
    if key == "models.0.pretrain":
        del spec["models"][0]["snapshots"]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_bad(spec, key, value)))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "sweep").exists()  # nothing started, nothing written


def test_sweep_offline_hub_name_is_a_missing_folder(tmp_path, tiny_model, task_files, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = {
        "out": str(tmp_path / "sweep"),
        "models": [{"name": "m", "base": "bert-base-chinse"}],
        "finetune": {**task_files, **FT},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(tmp_path / "s.yaml")]) == 2
    assert "base bert-base-chinse: no such folder (and HF_HUB_OFFLINE is set)" in capsys.readouterr().err


def test_sweep_runs_its_pretrain_section_first_and_not_again(tmp_path, tiny_model, corpus_dir, task_files, capsys):
    pt = {
        "corpus": corpus_dir,
        "max_steps": 2,
        "save_steps": 2,
        "max_seq_len": 48,
        "batch_size": 4,
        "num_workers": 0,
        "tensorboard": False,
        "eval_steps": 0,
        "logging_freq": 1,
    }
    spec = {
        "out": str(tmp_path / "sweep"),
        "seeds": [1],
        "floor": False,
        "models": [{"name": "tiny", "base": tiny_model, "pretrain": pt}],
        "finetune": {**task_files, **FT, "epochs": 1},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path)]) == 0
    snapshot = tmp_path / "sweep" / "pretrain" / "tiny" / "step-000002"
    assert (snapshot / "config.json").is_file()
    results = json.loads((tmp_path / "sweep" / "results.json").read_text())["cells"]
    assert [(r["model"], r["step"]) for r in results] == [("tiny", 0), ("tiny", 2)]
    assert "pretraining tiny" in capsys.readouterr().err
    stamp = (snapshot / "config.json").stat().st_mtime_ns
    assert main(["sweep", str(path)]) == 0
    assert "pretraining tiny" not in capsys.readouterr().err and (snapshot / "config.json").stat().st_mtime_ns == stamp


def test_cells_in_their_own_processes(tmp_path, tiny_model, task_files):
    """The path taken with several GPUs (one process per cell, CUDA_VISIBLE_DEVICES set), run here on CPU."""
    from domainlm.sweep.command import plan, run_cells

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    cfg = SweepConfig(
        out=str(tmp_path / "sweep"),
        seeds=[1],
        floor=False,
        finetune={**task_files, **FT, "epochs": 1},
        models=[{"name": "tiny", "base": tiny_model}, {"name": "broken", "base": str(broken)}],
    )
    cells = plan(cfg)
    run_cells(cfg, cells, tmp_path / "sweep", ["", ""])
    ok, bad = (
        tmp_path / "sweep" / "cells" / "tiny" / "base" / "seed-1",
        tmp_path / "sweep" / "cells" / "broken" / "base" / "seed-1",
    )
    assert (ok / "DONE").is_file() and json.loads((ok / "metrics.json").read_text())["test"]["n"] == 30
    assert (bad / "FAILED").read_text().startswith("RuntimeError: exit status 2: error:") and not (
        bad / "DONE"
    ).exists()


def test_device_plan_and_removal_fence(tmp_path):
    assert device_plan(1, 8) == [None]  # sequential unless asked
    assert device_plan(4, 1) == [None] and device_plan(4, 0) == [None]  # one device: one after another
    assert device_plan(4, 2) == ["0", "1"] and device_plan(2, 8) == ["0", "1"]
    cell = tmp_path / "cells" / "m" / "base" / "seed-1"
    cell.mkdir(parents=True)
    remove_inside(cell, tmp_path)
    assert not cell.exists()
    outside = tmp_path / "keep"
    outside.mkdir()
    for victim in (outside, tmp_path / "cells", tmp_path / "cells" / ".." / "keep"):
        with pytest.raises(DomainLMError, match="refusing to delete"):
            remove_inside(victim, tmp_path)
    assert outside.is_dir()


def _fake_cell(root: Path, folder: str, correct: np.ndarray) -> None:
    path = root / "cells" / folder
    path.mkdir(parents=True)
    rows = [{"line": i + 1, "gold": ["a"], "predicted": ["a" if c else "b"]} for i, c in enumerate(correct)]
    (path / "test_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "metrics.json").write_text(json.dumps({"test": {"accuracy": float(correct.mean())}}))
    (path / "DONE").write_text("")


def _summarize(tmp_path, cells, floor_accuracy: float) -> dict:
    """The summary of fake cells of one model "m" (3 seeds, 400 test rows) beside a floor of this accuracy."""
    cfg = SweepConfig(out=str(tmp_path), models=[{"name": "m", "base": "x"}], finetune={}, seeds=[1, 2, 3])
    task = {
        "task": "multiclass",
        "labels": ["a", "b"],
        "train": "t.jsonl",
        "train_rows": 100,
        "dev": None,
        "valid_rows": 20,
        "fit_rows": 80,
        "test": "test.jsonl",
        "test_rows": 400,
        "evaluated_on": "test",
        "metric": "accuracy",
        "seeds": [1, 2, 3],
        "selection_metric": "accuracy",
    }
    floor = {
        "method": "char_wb 1-3-gram TF-IDF + logistic regression (C=1)",
        "train_rows": 80,
        "seconds": 1.0,
        "test": {"accuracy": floor_accuracy},
    }
    return summarize(cfg, cells, outputs.Plain(tmp_path), task, floor)


@pytest.mark.parametrize(
    "gain,floor_accuracy,expected",
    [
        (0.25, 0.5, "Ship m step 10: accuracy"),
        (0.0, 0.5, "No checkpoint is distinguishable from its base model"),
        (0.25, 0.99, "no transformer cell beats it"),
        # a snapshot well below its base: a loss, said as one (the one-sided test alone would call it "not
        # distinguishable")
        (-0.2, 0.3, "No checkpoint beats its base model, and m step 10 (-"),
    ],
)
def test_conclusion_on_constructed_cells(tmp_path, gain, floor_accuracy, expected):
    rng = np.random.default_rng(0)
    cells = []
    for step, p in ((0, 0.6), (10, 0.6 + gain), (20, 0.6)):
        for seed in (1, 2, 3):
            cell = Cell("m", "base" if step == 0 else f"step {step}", step, "x", seed)
            _fake_cell(tmp_path, cell.folder, (rng.random(400) < p).astype(float))
            cells.append(cell)
    result = _summarize(tmp_path, cells, floor_accuracy)
    assert expected in result["conclusion"]
    star = [r for r in result["cells"] if r.get("star")]
    if gain > 0:
        assert [r["step"] for r in star] == [10] and star[0]["vs_base"]["p_holm"] < 0.05
        assert "★ step 10" in (tmp_path / "table.md").read_text()
    else:
        assert not star and "★ step" not in (tmp_path / "table.md").read_text()
    worse = [r["step"] for r in result["cells"] if r.get("vs_base", {}).get("loss")]
    assert worse == ([10] if gain < 0 else [])
    if gain < 0:
        assert "scores lower than its base model: keep the base model" in result["conclusion"]
        assert "| m | step 10 |" in (tmp_path / "table.md").read_text() and "†" in (tmp_path / "table.md").read_text()


def test_report_for_pretrain_and_finetune_runs(tmp_path, pretrain_run, tiny_model, capsys):
    assert main(["report", str(pretrain_run), "--out", str(tmp_path / "r1")]) == 0
    assert (tmp_path / "r1" / "curve_mlm_loss.png").stat().st_size > 1000
    assert "results.json" in (tmp_path / "r1" / "report.md").read_text()
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(10, 1))
    ft = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                "--model",
                tiny_model,
                "--train",
                train,
                "--out",
                str(ft),
                "--epochs",
                "1",
                "--max-seq-len",
                "32",
                "--no-floor",
            ]
        )
        == 0
    )
    assert main(["report", str(ft)]) == 0  # into a folder of its own: never over finetune's own report.md
    assert "metrics.json" in (ft / "report" / "report.html").read_text() and (ft / "report.md").is_file()
    assert main(["report", str(tmp_path)]) == 2
    assert "has no log.jsonl" in capsys.readouterr().err


def test_conclusion_when_a_winning_checkpoint_is_not_the_best_cell(tmp_path):
    rng = np.random.default_rng(0)
    cells = []
    for model, accuracies in (("a", ((0, 0.5), (10, 0.7))), ("b", ((0, 0.8), (10, 0.8)))):
        for step, p in accuracies:
            for seed in (1, 2, 3):
                cell = Cell(model, "base" if step == 0 else f"step {step}", step, "x", seed)
                _fake_cell(tmp_path, cell.folder, (rng.random(400) < p).astype(float))
                cells.append(cell)
    cfg = SweepConfig(
        out=str(tmp_path), models=[{"name": "a", "base": "x"}, {"name": "b", "base": "x"}], finetune={}, seeds=[1, 2, 3]
    )
    task = {
        "task": "multiclass",
        "labels": ["a", "b"],
        "train": "t.jsonl",
        "train_rows": 100,
        "dev": None,
        "valid_rows": 20,
        "fit_rows": 80,
        "test": "test.jsonl",
        "test_rows": 400,
        "evaluated_on": "test",
        "metric": "accuracy",
        "seeds": [1, 2, 3],
        "selection_metric": "accuracy",
    }
    result = summarize(cfg, cells, outputs.Plain(tmp_path), task, None)
    assert result["conclusion"].startswith("The best cell is b base, ")
    assert (
        "(a base model); a step 10 beats its base model after Holm adjustment, but scores lower."
        in result["conclusion"]
    )
    assert not any(r.get("star") for r in result["cells"])


@pytest.mark.parametrize(
    "blend_gain,floor_p,expected",
    [
        (0.2, 0.62, "Ship the blend of m step 10 with the floor (model weight 0.60): accuracy"),
        (0.0, 0.62, "it is not shown to beat the model alone"),
        (0.2, 0.95, "it beats the model alone by +"),  # the demo's case: above the model, not above the floor
    ],
)
def test_conclusion_weighs_the_blend_by_the_same_test(tmp_path, blend_gain, floor_p, expected):
    rng = np.random.default_rng(1)
    cells = []
    for step, p in ((0, 0.6), (10, 0.65)):
        for seed in (1, 2, 3):
            cell = Cell("m", "base" if step == 0 else f"step {step}", step, "x", seed)
            correct = (rng.random(400) < p).astype(float)
            _fake_cell(tmp_path, cell.folder, correct)
            if step:  # the cell's blend with its own floor: better than the model alone by blend_gain
                blended = np.maximum(correct, rng.random(400) < blend_gain / (1 - p))
                own_floor = rng.random(400) < floor_p  # fitted on this seed's rows: each cell has its own
                path = tmp_path / "cells" / cell.folder
                for name, values in (
                    ("blend_test_predictions.jsonl", blended),
                    ("floor/test_predictions.jsonl", own_floor),
                ):
                    rows = [
                        {"line": i + 1, "gold": ["a"], "predicted": ["a" if c else "b"]} for i, c in enumerate(values)
                    ]
                    (path / name).parent.mkdir(exist_ok=True)
                    (path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
                metrics = json.loads((path / "metrics.json").read_text())
                metrics["blend"] = {"weight": 0.6, "test": {"accuracy": float(blended.mean())}}
                metrics["floor"] = {"test": {"accuracy": float(own_floor.mean())}}
                (path / "metrics.json").write_text(json.dumps(metrics))
            cells.append(cell)
    result = _summarize(tmp_path, cells, floor_p)
    assert expected in result["conclusion"]
    if floor_p > 0.9:
        assert (
            "but is not shown to beat the floors it was mixed with (each cell's own, paired by seed) by -"
            in result["conclusion"]
        )
    blend = next(r["blend"] for r in result["cells"] if r["step"] == 10)
    assert set(blend) >= {"vs_model", "vs_floor", "accuracy", "weight"}
    assert (blend["vs_model"]["win"], blend["vs_floor"]["win"]) == {
        (0.2, 0.62): (True, True),
        (0.0, 0.62): (False, False),
        (0.2, 0.95): (True, False),
    }[blend_gain, floor_p]
    assert "| m + floor | step 10 |" in (tmp_path / "table.md").read_text()
    # the floors the blends were mixed with, per seed, in the table
    floors = [
        json.loads((tmp_path / "cells" / f"m/step-000010/seed-{s}/metrics.json").read_text())["floor"]["test"][
            "accuracy"
        ]
        for s in (1, 2, 3)
    ]
    row = next(
        line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| floor, per seed |")
    )
    assert " ".join(f"{100 * v:.1f}" for v in floors) in row
    if expected.startswith("Ship"):
        assert result["conclusion"].index("Without the blend:") > 0

"""Sweep definitions, plans, on-disk states and the dry-run table; the study's sweep files."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from medbench_jax.study import runs
from medbench_jax.study import sweep
from medbench_jax.study import sweep_catalog
from tests.helpers import REPO
from tests.helpers import TINY


@pytest.fixture(autouse=True)
def _from_repo_root(monkeypatch):
  monkeypatch.chdir(REPO)  # config paths in sweeps are relative to the repository root


def test_grid_is_the_product_of_the_axes_with_readable_stable_names():
  points = sweep.grid("configs/resnet50.py:data=chestxray14",
                      {"model.name": ["resnet50", "densenet121"],
                       "model.init": {"random": "random", "in1k": "/ckpt/r50.pth"},
                       "dataset.label_fraction": [0.01, 1.0], "arg.trials": [3]},
                      fixed={"num_trials": 2, "input.normalization": "model"},
                      labels={"data": "chestxray14"})
  assert len(points) == 2 * 2 * 2
  first = points[0]
  assert first.name == ("data=chestxray14,model=resnet50,init=random,label_fraction=0.01,"
                        "trials=3")
  assert first.workdir == first.name.replace(",", "/")
  assert first.config == "configs/resnet50.py:data=chestxray14,trials=3"
  assert dict(first.overrides) == {"num_trials": 2, "input.normalization": "model",
                                   "model.name": "resnet50", "model.init": "random",
                                   "dataset.label_fraction": 0.01}
  assert [p.name.split(",")[2] for p in points[:4]] == [
      "init=random", "init=random", "init=in1k", "init=in1k"]  # first axis outermost
  assert points[3].overrides[-2:] == (("model.init", "/ckpt/r50.pth"),
                                      ("dataset.label_fraction", 1.0))
  # The same sweep file gives the same names.
  assert [p.name for p in points] == [p.name for p in sweep.grid(
      "configs/resnet50.py:data=chestxray14",
      {"model.name": ["resnet50", "densenet121"],
       "model.init": {"random": "random", "in1k": "/ckpt/r50.pth"},
       "dataset.label_fraction": [0.01, 1.0], "arg.trials": [3]},
      labels={"data": "chestxray14"})]


def test_config_axis_and_value_formats():
  points = sweep.grid("unused.py", {"config": {"r": "configs/resnet50.py", "s": "configs/swin.py"},
                                    "arg.paper": [True]})
  assert [(p.name, p.config) for p in points] == [
      ("config=r,paper=true", "configs/resnet50.py:paper=true"),
      ("config=s,paper=true", "configs/swin.py:paper=true")]
  assert sweep.format_value(False) == "false" and sweep.format_value(0.1) == "0.1"
  assert sweep.format_value((1, 2)) == "(1, 2)" and sweep.format_value(1 / 3) == repr(1 / 3)


@pytest.mark.parametrize("axes,message", [
    ({"model.init": ["/ckpt/resnet50.pth"]}, "cannot name a point"),
    ({"model.init": {"a b": "x"}}, "letters, digits"),
    ({"model.name": []}, "has no values"),
    ({"model.name": "resnet50"}, "must be a list"),
    ({"model.name": ["a"], "arg.model": ["b"]}, "more than one axis"),
    ({"arg.init": {"xy": "x,y"}}, "cannot hold ','"),
])
def test_grid_errors_say_what_to_do(axes, message):
  with pytest.raises(ValueError, match=message):
    sweep.grid("configs/resnet50.py", axes)


def _tiny(name_axes, **kw):
  return sweep.grid(TINY, name_axes, **kw)


def test_plan_orders_dependencies_resolves_runs_and_reads_num_trials(tmp_path, phantom_dir):
  source = _tiny({"model.init": ["random"]}, labels={"stage": "a"},
                 fixed={"num_trials": 3, "dataset.manual_dir": str(phantom_dir)})
  target = _tiny({"model.init": {"chain": sweep.run_of(source[0])}}, labels={"stage": "b"},
                 fixed={"dataset.manual_dir": str(phantom_dir)})
  plan = sweep.plan(sweep.Sweep("s", target + source), tmp_path)
  assert [p.name for p in plan.points] == ["stage=a,init=random", "stage=b,init=chain"]
  first, second = plan.points
  assert second.depends_on == ("stage=a,init=random",)
  assert second.overrides["model.init"] == f"run:{tmp_path}/stage=a/init=random"
  assert f"--config.model.init=run:{tmp_path}/stage=a/init=random" in second.main_args()
  assert (first.num_trials, second.num_trials) == (3, 1)
  assert first.dataset["manual_dir"] == str(phantom_dir)
  assert len(sweep.datasets(plan.points)) == 1  # one data set to prepare


def test_plan_fails_before_running_anything_naming_every_bad_point(tmp_path):
  points = (_tiny({"model.name": ["resnet18", "resnet5"]})
            + _tiny({"optim.lrr": [0.1]}) + _tiny({"train.num_epochs": ["many"]})
            + sweep.grid("configs/nothere.py", {"seed": [1]}))
  with pytest.raises(ValueError) as error:
    sweep.plan(sweep.Sweep("bad", points), tmp_path)
  message = str(error.value)
  assert message.startswith("4 point(s) of bad cannot run")
  assert "model=resnet5: config.model.name='resnet5' is not allowed" in message
  assert "lrr=0.1: config.optim.lrr does not exist" in message
  assert "num_epochs=many: config.train.num_epochs='many'" in message
  assert "configs/nothere.py does not exist" in message
  assert "model=resnet18" not in message


def test_plan_checks_fsdp_without_the_devices_of_the_runner(tmp_path):
  """A point's devices are those of its slot or allocation, not the planner's 8 CPU
  devices: an fsdp of 3 plans (main checks it where the point runs); 0 never can."""
  plan = sweep.plan(sweep.Sweep("mesh", _tiny({"mesh.fsdp": [3]})), tmp_path)
  assert plan.points[0].overrides == {"mesh.fsdp": 3}
  with pytest.raises(ValueError, match=r"fsdp=0: config.mesh.fsdp=0 is not allowed; "
                                       "allowed: a positive integer"):
    sweep.plan(sweep.Sweep("mesh", _tiny({"mesh.fsdp": [0]})), tmp_path)


@pytest.mark.parametrize("points,message", [
    (lambda: _tiny({"seed": [1, 1]}), "occur more than once"),
    (lambda: _tiny({"model.init": {"x": sweep.run_of("nobody")}}), "does not define"),
    (lambda: (_tiny({"model.init": {"a": sweep.run_of("init=b")}}) +
              _tiny({"model.init": {"b": sweep.run_of("init=a")}})), "cycle: init=a -> init=b"),
])
def test_plan_rejects_ambiguous_sweeps(tmp_path, points, message):
  with pytest.raises(ValueError, match=message):
    sweep.plan(sweep.Sweep("bad", points()), tmp_path, validate=False)


def _results(workdir: pathlib.Path) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "results.json").write_text("{}")


def test_states_on_disk_and_the_dry_run_table(tmp_path):
  points = _tiny({"seed": [0, 1, 2, 3, 4]})
  after_failed = _tiny({"model.init": {"x": sweep.run_of(points[4])}})
  after_blocked = _tiny({"model.init": {"y": sweep.run_of(after_failed[0])}},
                        labels={"next": "1"})
  plan = sweep.plan(sweep.Sweep("s", points + after_failed + after_blocked), tmp_path,
                    validate=False)
  done, checkpointed, trial_done, new, failed = (p.workdir for p in plan.points[:5])
  _results(done)
  (checkpointed / "trial_0" / "ckpt" / "latest" / "12").mkdir(parents=True)
  (trial_done / "trial_0").mkdir(parents=True)
  (trial_done / "trial_0" / "result.json").write_text("{}")
  (new / "trial_0" / "ckpt" / "latest").mkdir(parents=True)  # nothing saved yet
  sweep.write_status(failed, sweep.FAILED, "exit status 1; last lines:\nNaN loss")
  rows = sweep.assess(plan)
  assert [r.state for r in rows] == ["done", "resumable", "resumable", "new", "new",
                                     "blocked", "blocked"]
  assert rows[4].note == "last attempt: failed (exit status 1; last lines:)"
  assert rows[5].note.startswith("after seed=4; depends on seed=4, which failed")
  assert "depends on init=x, which is blocked" in rows[6].note
  text = sweep.table(rows).splitlines()
  assert text[0].split() == ["point", "workdir", "state", "note"]
  assert text[1].split() == ["seed=0", "seed=0", "done"]
  assert text[-1] == "7 points: 1 done, 2 resumable, 2 new, 2 blocked"


def test_sweep_json_and_status_files_are_what_the_report_reads(tmp_path):
  points = _tiny({"seed": [0, 1]}) + _tiny({"model.init": {"x": sweep.run_of("seed=1")}})
  plan = sweep.plan(sweep.Sweep("s", points), tmp_path, validate=False)
  sweep.write_sweep_json(plan, ["python", "-m", "medbench_jax.sweep"])
  saved = json.loads((tmp_path / "sweep.json").read_text())
  assert saved["sweep"] == "s" and saved["points"][2] == {
      "name": "init=x", "workdir": "init=x", "num_trials": None, "depends_on": ["seed=1"],
      "config": TINY, "overrides": {"model.init": f"run:{tmp_path}/seed=1"}}
  sweep.write_status(plan.points[1].workdir, sweep.FAILED, "exit status 1")
  sweep.write_status(plan.points[2].workdir, sweep.BLOCKED, "depends on seed=1, which failed")
  problems = {p.run: (p.kind, p.detail) for p in runs.collect(tmp_path).problems}
  assert problems == {"seed=0": ("missing", "no results.json"),
                      "seed=1": ("failed", "exit status 1"),
                      "init=x": ("blocked", "depends on seed=1, which failed")}


def _sweep_file(tmp_path: pathlib.Path, body: str) -> str:
  path = tmp_path / "sweep_file.py"
  path.write_text("from medbench_jax.study import sweep\n\n\ndef get_sweep(arg=None):\n"
                  + body)
  return str(path)


def test_dry_run_cli_prints_the_plan_and_writes_nothing(tmp_path, phantom_dir):
  spec = _sweep_file(tmp_path, f"  return sweep.Sweep('cli', sweep.grid({TINY!r}, "
                     "{'seed': [0, 1], 'arg.epochs': [int(arg or 1)]}, "
                     f"fixed={{'dataset.manual_dir': {str(phantom_dir)!r}}}))\n")
  root = tmp_path / "root"
  _results(root / "seed=0" / "epochs=2")
  out = subprocess.run([sys.executable, "-m", "medbench_jax.sweep", f"--sweep={spec}:2",
                        f"--root={root}", "--dry_run"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert lines[1].split() == ["seed=0,epochs=2", "seed=0/epochs=2", "done"]
  assert lines[2].split() == ["seed=1,epochs=2", "seed=1/epochs=2", "new"]
  assert lines[3] == "2 points: 1 done, 1 new"
  assert sorted(p.name for p in root.iterdir()) == ["seed=0"]  # no sweep.json, no lock
  bad = subprocess.run([sys.executable, "-m", "medbench_jax.sweep", f"--sweep={spec}:x",
                        f"--root={root}", "--dry_run"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith(f"sweep: {spec}:x: invalid literal")


# ---------------------------------------------------------------------- study sweeps

STUDY = {  # sweep file -> (arg, number of points)
    "architectures": ("", 4 * 8),
    "label_fractions": ("", 2 * 3 * 7),
    "granularity": ("data=cls", 4 * 9),
    "ssl": ("", 4 * 15),
    # 5 source runs; per target: ResNet-50 from ImageNet and 3 sources, Swin-B and
    # ConvNeXt-B from ImageNet and MIMIC; ChestX-ray14 and CheXpert are not their own source.
    "domain_adaptive": ("data=cls", 5 + 4 * (4 + 2 + 2) - 2),
}


@pytest.mark.parametrize("name", sorted(STUDY))
def test_study_sweeps_plan_with_their_checkpoints(tmp_path, name, monkeypatch):
  monkeypatch.setenv("MEDBENCH_CHECKPOINTS", "/ckpt")
  monkeypatch.setenv("MEDBENCH_DATA", "/data")
  arg, size = STUDY[name]
  spec = f"configs/sweeps/{name}.py" + (f":{arg}" if arg else "")
  plan = sweep.plan(sweep.load_sweep(spec), tmp_path, source=spec)
  assert len(plan.points) == size
  for point in plan.points:
    assert point.num_trials == (1 if point.name.startswith("stage=source") else 10)
    init = point.overrides["model.init"]
    assert init.startswith("/ckpt/") or init.startswith(f"run:{tmp_path}/stage=source/")
    assert point.dataset["manual_dir"].startswith("/data/")
  inits = {p.overrides["model.init"] for p in plan.points}
  catalogued = {os.path.join("/ckpt", c.path) for c in sweep_catalog.CHECKPOINTS.values()}
  assert {i for i in inits if not i.startswith("run:")} <= catalogued


def test_domain_adaptive_chains_run_the_source_stage_first(tmp_path):
  plan = sweep.plan(sweep.load_sweep("configs/sweeps/domain_adaptive.py:data=shenzhen_cxr"),
                    tmp_path, validate=False)
  by_name = plan.by_name()
  chained = [p for p in plan.points if p.depends_on]
  assert len(chained) == 5  # three sources for ResNet-50, MIMIC for Swin-B and ConvNeXt-B
  names = [p.name for p in plan.points]
  for point in chained:
    (source,) = point.depends_on
    assert names.index(source) < names.index(point.name)
    assert point.overrides["model.init"] == f"run:{by_name[source].workdir}"
    assert source.startswith("stage=source,") and source.split(",")[2:] == [
        point.name.split(",")[2], "init=in1k"]  # same model, from ImageNet
  released = sweep.plan(sweep.load_sweep(
      "configs/sweeps/domain_adaptive.py:data=shenzhen_cxr,released"), tmp_path,
      validate=False)
  assert not any(p.depends_on for p in released.points)
  assert len(released.points) == len(plan.points) - 5


def test_segmentation_targets_use_unet_or_upernet_configs():
  assert sweep_catalog.config_for("montgomery", "resnet50") == (
      "configs/unet_resnet50.py:data=montgomery,model=unet_resnet50")
  assert sweep_catalog.config_for("drive", "swin_base_patch4_window7_224") == (
      "configs/upernet_swin.py:data=drive,model=upernet_swin_base_patch4_window7_224")
  assert sweep_catalog.targets("cls+drive") == [*sweep_catalog.CLASSIFICATION, "drive"]
  with pytest.raises(ValueError, match="Unknown data set 'nih'"):
    sweep_catalog.targets("nih")


def test_demo_sweep_plans_two_models_two_fractions_and_a_chain(tmp_path):
  plan = sweep.plan(sweep.load_sweep("configs/sweeps/demo.py"), tmp_path)
  assert [p.name for p in plan.points] == [
      "model=resnet18,init=random,label_fraction=0.25",
      "model=resnet18,init=random,label_fraction=1",
      "model=swin_demo_patch4_window4_96,init=random,label_fraction=0.25",
      "model=swin_demo_patch4_window4_96,init=random,label_fraction=1",
      "model=resnet18,init=chain,label_fraction=0.25"]
  chain = plan.points[-1]
  assert chain.depends_on == ("model=resnet18,init=random,label_fraction=1",)
  assert {p.num_trials for p in plan.points} == {2}
  # One phantom set, prepared at two sizes (48 px crops for ResNet-18, 64 for the Swin).
  assert sorted(d["image_size"] for d in sweep.datasets(plan.points)) == [56, 72]

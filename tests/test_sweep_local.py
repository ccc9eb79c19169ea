"""The local sweep runner: order, blocking, failures, parallel slots, stopping; then end to
end on phantom data with medbench_jax.main, an interrupted run, a chain and the report.

The first tests run a stand-in for medbench_jax.main (a short script whose behaviour each
point picks), so the runner's decisions are checked in seconds; the end-to-end tests run
the real trainer and compare the report's statistics with numpy/scipy.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from medbench_jax.study import slots as slots_lib
from medbench_jax.study import sweep
from medbench_jax.study import sweep_local
from tests.helpers import REPO
from tests.helpers import TINY

# Stand-in for medbench_jax.main: `python fake_main.py WORKDIR BEHAVIOUR`.
FAKE_MAIN = textwrap.dedent("""
    import json, os, signal, sys, time
    workdir, behaviour = sys.argv[1], sys.argv[2]
    with open(os.path.join(workdir, "env.json"), "w") as f:
      json.dump({"xla": os.environ.get("XLA_FLAGS", ""), "start": time.time(),
                 "cores": sorted(os.sched_getaffinity(0))}, f)
    print("training", workdir, flush=True)
    if behaviour == "fail":
      print("ValueError: config.model.init: no such checkpoint", flush=True)
      sys.exit(3)
    if behaviour == "wait":  # until SIGTERM, then 'save' and exit as main does
      signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
      time.sleep(120)
    time.sleep(float(behaviour) if behaviour.replace(".", "").isdigit() else 0)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"end": time.time()}, f)
""")


@pytest.fixture(name="fake")
def _fake(tmp_path):
  script = tmp_path / "fake_main.py"
  script.write_text(FAKE_MAIN)

  def command(point, slot=None):
    del slot  # the slot's devices are in the environment
    return [sys.executable, str(script), str(point.workdir), point.overrides["seed"]]

  return command


def _plan(root, behaviours: dict[str, str], chains: dict[str, str] = None):
  """Points named seed=<label> whose 'seed' override is the fake's behaviour; chains:
  {label: label of the point it initialises from}."""
  points = []
  for label, behaviour in behaviours.items():
    points += sweep.grid(TINY, {"seed": {label: behaviour}})
  for label, source in (chains or {}).items():
    points += sweep.grid(TINY, {"seed": {label: "0"}},
                         fixed={"model.init": sweep.run_of(f"seed={source}")})
  return sweep.plan(sweep.Sweep("fake", points), root, validate=False)


def _run(plan, command, slots=None, environ=None):
  lines = []
  outcome = sweep_local.run(plan, slots or [slots_lib.Slot({})], command=command,
                            environ=environ or os.environ, out=lines.append)
  return outcome, lines


def test_failed_dependency_blocks_its_dependants_and_reruns_skip_what_finished(
    tmp_path, fake):
  plan = _plan(tmp_path, {"a": "0", "b": "fail", "d": "0"}, chains={"c": "b", "e": "c",
                                                                      "f": "a"})
  outcome, lines = _run(plan, fake)
  assert outcome == {"seed=a": "done", "seed=b": "failed", "seed=d": "done",
                     "seed=c": "blocked", "seed=e": "blocked", "seed=f": "done"}
  by_name = {n: pathlib.Path(p.workdir) for n, p in plan.by_name().items()}
  failed = sweep.read_status(plan.by_name()["seed=b"].workdir)
  assert failed["state"] == "failed" and failed["returncode"] == 3
  assert failed["reason"].startswith("exit status 3; last lines of")
  assert "ValueError: config.model.init: no such checkpoint" in failed["reason"]
  assert sweep.read_status(by_name["seed=c"])["reason"] == (
      "depends on seed=b, which failed")
  assert sweep.read_status(by_name["seed=e"])["reason"] == (
      "depends on seed=c, which is blocked")
  assert not (by_name["seed=c"] / "log.txt").exists()  # never started
  assert sweep.read_status(by_name["seed=a"])["state"] == "done"
  log = (by_name["seed=a"] / "log.txt").read_text()
  assert log.count("===== ") == 1 and "training" in log
  assert any(line.startswith("blocked  seed=e: depends on seed=c") for line in lines)
  # The chain's dependency finished first; the chain starts from its source's workdir.
  assert plan.by_name()["seed=f"].overrides["model.init"] == f"run:{by_name['seed=a']}"
  ends = {n: json.loads((by_name[n] / "results.json").read_text())["end"]
          for n in ("seed=a", "seed=f")}
  starts = json.loads((by_name["seed=f"] / "env.json").read_text())["start"]
  assert ends["seed=a"] <= starts
  # Rerun: finished points are not started again; the failed one is retried.
  mtime = (by_name["seed=a"] / "results.json").stat().st_mtime_ns
  outcome, lines = _run(plan, fake)
  assert lines[0] == "6 points: 3 done, 3 to run on 1 slot(s)."
  assert (by_name["seed=a"] / "results.json").stat().st_mtime_ns == mtime
  assert (by_name["seed=a"] / "log.txt").read_text() == log
  assert (by_name["seed=b"] / "log.txt").read_text().count("===== ") == 2
  assert outcome["seed=c"] == "blocked"


def test_parallel_slots_run_at_once_on_disjoint_simulated_devices_and_cores(tmp_path, fake):
  plan = _plan(tmp_path, {"a": "3", "b": "3"})
  environ = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_fast_math=false "
                 "--xla_force_host_platform_device_count=8")
  slots = slots_lib.local_slots(2, platform="cpu", environ=environ)
  outcome, _ = _run(plan, fake, slots, environ)
  assert set(outcome.values()) == {"done"}
  seen = [json.loads((p.workdir / "env.json").read_text()) for p in plan.points]
  ends = [json.loads((p.workdir / "results.json").read_text())["end"] for p in plan.points]
  assert max(s["start"] for s in seen) < min(ends)  # both ran at the same time
  for s in seen:
    assert s["xla"] == ("--xla_cpu_enable_fast_math=false "
                        "--xla_force_host_platform_device_count=4")
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) >= 2:
    assert not set(seen[0]["cores"]) & set(seen[1]["cores"])
    assert sorted(seen[0]["cores"] + seen[1]["cores"]) == cores[:2 * (len(cores) // 2)]


DRIVER = textwrap.dedent("""
    import json, sys
    from medbench_jax.study import slots, sweep, sweep_local
    points = sweep.grid({tiny!r}, {{"seed": {{"a": "wait", "b": "0"}}}})
    plan = sweep.plan(sweep.Sweep("stop", points), {root!r}, validate=False)
    command = lambda p, s: [sys.executable, {script!r}, str(p.workdir), p.overrides["seed"]]
    outcome = sweep_local.run(plan, [slots.Slot({{}})], command=command)
    print(json.dumps(outcome))
""")


def test_sigterm_stops_the_sweep_after_the_running_point_saved(tmp_path):
  (tmp_path / "fake_main.py").write_text(FAKE_MAIN)
  driver = tmp_path / "driver.py"
  driver.write_text(DRIVER.format(tiny=TINY, root=str(tmp_path / "root"),
                                  script=str(tmp_path / "fake_main.py")))
  proc = subprocess.Popen([sys.executable, str(driver)], cwd=REPO, stdout=subprocess.PIPE,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
  started = tmp_path / "root" / "seed=a" / "env.json"
  deadline = time.time() + 120
  while not started.exists() and time.time() < deadline:
    time.sleep(0.2)
  assert started.exists()
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  outcome = json.loads(out.strip().splitlines()[-1])
  assert outcome == {"seed=a": "preempted", "seed=b": "new"}  # b was never started
  status = sweep.read_status(tmp_path / "root" / "seed=a")
  assert status["state"] == "preempted" and "rerun the sweep to resume" in status["reason"]
  assert not (tmp_path / "root" / "seed=b").exists()


# ---------------------------------------------------------------------- end to end


def _torch_checkpoints(directory: pathlib.Path) -> dict[str, str]:
  """Random-init weights of the two tiny models as their publishers save them."""

  import timm
  import torch
  import torchvision
  directory.mkdir(parents=True, exist_ok=True)
  torch.manual_seed(0)
  swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64,
                           window_size=4, embed_dim=16, depths=(1, 1, 1, 1),
                           num_heads=(1, 1, 2, 2))
  torch.save(swin.state_dict(), directory / "swin_tiny16.pth")
  torch.save(torchvision.models.resnet18().state_dict(), directory / "resnet18.pth")
  return {"swin_demo_patch4_window4_128": str(directory / "swin_tiny16.pth"),
          "resnet18": str(directory / "resnet18.pth")}


def _write_sweep(path: pathlib.Path, body: str) -> str:
  path.write_text("from medbench_jax.study import sweep\n\n" + textwrap.dedent(body))
  return str(path)


def _sweep(spec: str, root: pathlib.Path, *extra: str, wait=True, cache=None):
  """cache: the runs' MEDBENCH_CACHE (their compilation cache), shared by reruns."""
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="", MEDBENCH_CACHE=str(cache))
  cmd = [sys.executable, "-m", "medbench_jax.sweep", f"--sweep={spec}", f"--root={root}",
         *extra]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=3000)
  return proc.returncode, out


def _kill_mid_trial(root: pathlib.Path, point: str, proc, timeout_s=1500):
  """SIGKILLs the point's main process once trial 1 has a committed checkpoint (orbax
  renames a checkpoint to its step number when it is complete)."""
  workdir = root / point.replace(",", "/")
  latest = workdir / "trial_1" / "ckpt" / "latest"
  deadline = time.time() + timeout_s
  while time.time() < deadline and proc.poll() is None:
    if latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir()):
      os.kill(sweep.read_status(workdir)["pid"], signal.SIGKILL)
      return
    time.sleep(0.2)
  raise AssertionError(f"{point} never saved a checkpoint in trial 1")


def _check_report(root: pathlib.Path, out: pathlib.Path, baseline_model: str) -> pd.DataFrame:
  """The report's means, stds and p-values against numpy/scipy on the results.json files."""
  report = subprocess.run(
      [sys.executable, "-m", "medbench_jax.report", f"--runs={root}", f"--out={out}",
       f"--baseline={baseline_model}/random", "--noplots", "--bootstrap_resamples=0"],
      cwd=REPO, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert report.returncode == 0, report.stderr[-3000:]
  summary = pd.read_csv(out / "summary.csv")
  values = {}
  for path in root.rglob("results.json"):
    results = json.loads(path.read_text())
    key = (results["model"], results["init"], results["label_fraction"])
    values[key] = np.array([t["test"]["mean_auc"] for t in results["trials"]])
  assert len(summary) == len(values)
  for row in summary.itertuples():
    mine = values[(row.model, row.init, row.label_fraction)]
    base = values[(baseline_model, "random", row.label_fraction)]
    assert row.n == len(mine)
    np.testing.assert_allclose(row.mean, mine.mean(), rtol=1e-9)
    np.testing.assert_allclose(row.std, mine.std(ddof=1), rtol=1e-9)
    if (row.model, row.init) == (baseline_model, "random"):
      assert np.isnan(row.p_value)
    else:
      np.testing.assert_allclose(row.p_value, scipy.stats.ttest_ind(mine, base).pvalue,
                                 rtol=1e-7)
  return summary


def _mtimes(root: pathlib.Path) -> dict[str, int]:
  return {str(p.parent): p.stat().st_mtime_ns for p in root.rglob("results.json")}


FAST_SWEEP = """
    def get_sweep(arg=None):
      ckpt, phantom = arg.split("+")
      fixed = {{"num_trials": 2, "dataset.manual_dir": phantom}}
      points = sweep.grid({tiny!r}, {{"model.init": {{"random": "random", "pth": ckpt}}}},
                          fixed=fixed)
      points += sweep.grid({tiny!r}, {{"model.init": {{
          "chain": sweep.run_of(points[0]), "missing": "/nonexistent/swin.pth"}}}}, fixed=fixed)
      points += sweep.grid({tiny!r}, {{"model.init": {{"chain2": sweep.run_of(points[-1])}}}},
                           fixed=fixed)
      return sweep.Sweep("e2e_fast", points)
"""


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_local_sweep_end_to_end_with_an_interruption_a_chain_a_failure_and_the_report(
    tmp_path, phantom_dir):
  """The tests' tiny Swin from random init and from a timm checkpoint, 2 trials each; a run
  killed mid-way and resumed; a two-step chain; a run that fails and the chain step that
  depends on it."""
  ckpt = _torch_checkpoints(tmp_path / "ckpt")["swin_demo_patch4_window4_128"]
  spec = _write_sweep(tmp_path / "fast.py", FAST_SWEEP.format(tiny=TINY))
  spec = f"{spec}:{ckpt}+{phantom_dir}"
  root, cache = tmp_path / "root", tmp_path / "cache"
  proc = _sweep(spec, root, wait=False, cache=cache)
  _kill_mid_trial(root, "init=pth", proc)
  out, _ = proc.communicate(timeout=3000)
  assert proc.returncode == 1, out[-3000:]  # a point failed and one is blocked
  assert re.search(r"failed   init=pth after \d+ s: killed by SIGKILL", out)
  status = {p.name: sweep.read_status(p) for p in root.glob("init=*")}
  assert status["init=pth"]["state"] == "failed"
  assert status["init=missing"]["state"] == "failed"
  assert "/nonexistent/swin.pth" in status["init=missing"]["reason"]
  assert status["init=chain2"] == {**status["init=chain2"], "state": "blocked",
                                   "reason": "depends on init=missing, which failed"}
  assert (root / "init=pth/trial_0/result.json").exists()
  finished = _mtimes(root)
  assert len(finished) == 2  # random and the chain

  code, out = _sweep(spec, root, cache=cache)
  assert code == 1, out[-3000:]
  assert out.splitlines()[0] == "5 points: 2 done, 3 to run on 1 slot(s)."
  assert {k: v for k, v in _mtimes(root).items() if k in finished} == finished
  log = (root / "init=pth/log.txt").read_text()
  assert "Trial 0 already finished" in log
  assert re.search(r"Resuming trial 1 from step (4|8)", log)
  config = json.loads((root / "init=chain/config.json").read_text())
  assert config["model"]["init"] == f"run:{root}/init=random"
  results = json.loads((root / "init=pth/results.json").read_text())
  assert results["provenance"]["weights_file"] == ckpt and len(results["trials"]) == 2

  summary = _check_report(root, tmp_path / "report", "swin_demo_patch4_window4_128")
  assert len(summary) == 3
  problems = pd.read_csv(tmp_path / "report" / "problems.csv")
  assert sorted(problems["kind"]) == ["blocked", "failed"]
  assert problems.set_index("kind").loc["blocked", "run"] == "init=chain2"


FULL_SWEEP = """
    def get_sweep(arg=None):
      swin_ckpt, resnet_ckpt, phantom = arg.split("+")
      fixed = {{"num_trials": 3, "dataset.manual_dir": phantom}}
      points = []
      for model, ckpt in (("swin_demo_patch4_window4_128", swin_ckpt),
                          ("resnet18", resnet_ckpt)):
        points += sweep.grid({tiny!r}, {{"arg.model": [model],
                                        "model.init": {{"random": "random", "pth": ckpt}},
                                        "dataset.label_fraction": [0.5, 1.0]}}, fixed=fixed)
      source = points[-1]  # resnet18 from the checkpoint, all labels
      points += sweep.grid({tiny!r}, {{"arg.model": ["resnet18"],
                                      "model.init": {{"chain": sweep.run_of(source)}},
                                      "dataset.label_fraction": [0.5]}}, fixed=fixed)
      return sweep.Sweep("e2e", points)
"""


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_local_sweep_end_to_end_two_models_two_inits_two_fractions_three_trials(
    tmp_path, phantom_dir):
  ckpts = _torch_checkpoints(tmp_path / "ckpt")
  spec = _write_sweep(tmp_path / "full.py", FULL_SWEEP.format(tiny=TINY))
  spec = (f"{spec}:{ckpts['swin_demo_patch4_window4_128']}+{ckpts['resnet18']}+"
          f"{phantom_dir}")
  root, cache = tmp_path / "root", tmp_path / "cache"
  proc = _sweep(spec, root, "--parallel=2", wait=False, cache=cache)
  victim = "model=swin_demo_patch4_window4_128,init=pth,label_fraction=1"
  _kill_mid_trial(root, victim, proc)
  out, _ = proc.communicate(timeout=3000)
  assert proc.returncode == 1, out[-3000:]
  finished = _mtimes(root)
  assert len(finished) == 8

  code, out = _sweep(spec, root, "--parallel=2", cache=cache)
  assert code == 0, out[-3000:]
  assert out.splitlines()[0] == "9 points: 8 done, 1 to run on 2 slot(s)."
  assert {k: v for k, v in _mtimes(root).items() if k in finished} == finished
  assert re.search(r"Resuming trial 1 from step", (root / victim.replace(",", "/") /
                                                  "log.txt").read_text())
  chain = root / "model=resnet18/init=chain/label_fraction=0.5"
  assert json.loads((chain / "config.json").read_text())["model"]["init"] == (
      f"run:{root}/model=resnet18/init=pth/label_fraction=1")
  for path in root.rglob("results.json"):
    assert json.loads(path.read_text())["provenance"]["devices"]["count"] == 1
  summary = _check_report(root, tmp_path / "report", "resnet18")
  assert len(summary) == 9 and set(summary["n"]) == {3}

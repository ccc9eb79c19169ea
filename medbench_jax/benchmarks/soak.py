"""A long training run watched from outside: memory, open files, child processes and the
checkpoint folder over thousands of steps (`python -m medbench_jax.bench soak`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any


def _proc_status_kb(pid: int, field: str) -> int:
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


def _descendants(pid: int) -> list[int]:
  """Every process below `pid` (children, grandchildren, ...), from /proc."""
  children: dict[int, list[int]] = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        # The command name, in parentheses, may hold spaces: fields follow its ')'.
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
      continue  # ended meanwhile
    children.setdefault(ppid, []).append(int(entry))
  found, pending = [], [pid]
  while pending:
    for child in children.get(pending.pop(), []):
      found.append(child)
      pending.append(child)
  return found


def _folder_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.lstat(os.path.join(root, name)).st_size
      except OSError:
        pass  # deleted meanwhile (retention)
  return total


def soak_sample(pid: int, ckpt_dir: str) -> dict[str, Any]:
  """One look at a running trainer from outside (memory in MiB, folder in bytes)."""
  family = _descendants(pid)
  rss = {}
  for p in [pid, *family]:
    try:
      rss[p] = _proc_status_kb(p, "VmRSS") / 1024
    except OSError:
      rss[p] = 0.0
  folders = {kind: sorted(os.listdir(os.path.join(ckpt_dir, kind)))
             if os.path.isdir(os.path.join(ckpt_dir, kind)) else []
             for kind in ("latest", "best")}
  return {"rss_mb": round(rss[pid], 1), "rss_with_children_mb": round(sum(rss.values()), 1),
          "open_files": len(os.listdir(f"/proc/{pid}/fd")),
          "child_processes": len(family), "ckpt_bytes": _folder_bytes(ckpt_dir),
          "ckpt_entries": sum(len(v) for v in folders.values())}


def bench_soak(config_file: str, workdir: str, *, steps: int, eval_every: int,
               warmup: int, sample_every_s: float) -> dict[str, Any]:
  """Runs main for `steps` steps in a child process, sampling it (module docstring)."""
  if os.path.exists(workdir):
    raise ValueError(f"--workdir={workdir} exists: the soak needs a fresh run.")
  os.makedirs(workdir)
  overrides = {"train.max_steps": steps, "train.num_epochs": steps,
               "train.eval_every_steps": eval_every, "train.patience": steps,
               "train.log_every_steps": min(eval_every, 50)}
  command = [sys.executable, "-u", "-m", "medbench_jax.main", f"--config={config_file}",
             f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]
  log_path = os.path.join(workdir, "soak_main.log")
  ckpt_dir = os.path.join(workdir, "trial_0", "ckpt")
  samples: list[dict[str, Any]] = []
  start = time.perf_counter()
  with open(log_path, "w") as log, open(log_path) as reader:
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    step, training = 0, True
    with open(os.path.join(workdir, "soak_samples.jsonl"), "w") as out:
      while proc.poll() is None:
        time.sleep(sample_every_s)
        for line in reader.readlines():
          if found := re.search(r"\] step (\d+)/\d+ ", line):
            step = int(found.group(1))
          training = training and "] test (best step" not in line
        try:
          sample = {"t_s": round(time.perf_counter() - start, 1), "step": step,
                    "training": training, **soak_sample(proc.pid, ckpt_dir)}
        except OSError:
          break  # the trainer ended between poll and sample
        if proc.poll() is not None:
          break  # ended while sampled: an exited process shows no memory
        samples.append(sample)
        out.write(json.dumps(sample) + "\n")
        out.flush()
  if proc.wait():
    raise RuntimeError(f"The soak run failed (exit status {proc.returncode}); see {log_path}")
  trained = [s for s in samples if s["training"] and s["step"] >= warmup]
  if len(trained) < 2:
    raise RuntimeError(f"Too few samples after warm-up ({len(trained)}): lower --warmup or "
                       "--sample_every.")
  first, last = trained[0], trained[-1]
  peak = max(s["rss_mb"] for s in trained)
  return {
      "bench": "soak", "config": config_file, "steps": steps, "eval_every": eval_every,
      "evaluations": steps // eval_every, "wall_s": round(time.perf_counter() - start, 1),
      "samples": len(samples), "warmup_step": first["step"], "end_step": last["step"],
      "rss_mb_warmup": first["rss_mb"], "rss_mb_end": last["rss_mb"], "rss_mb_peak": peak,
      "rss_growth_pct": round(100 * (last["rss_mb"] - first["rss_mb"]) / first["rss_mb"], 2),
      "rss_with_children_mb_warmup": first["rss_with_children_mb"],
      "rss_with_children_mb_end": last["rss_with_children_mb"],
      "open_files_range": [min(s["open_files"] for s in trained),
                           max(s["open_files"] for s in trained)],
      "child_processes_range": [min(s["child_processes"] for s in trained),
                                max(s["child_processes"] for s in trained)],
      "ckpt_mb_range": [round(min(s["ckpt_bytes"] for s in trained) / 2**20, 2),
                        round(max(s["ckpt_bytes"] for s in trained) / 2**20, 2)],
      "ckpt_entries_max": max(s["ckpt_entries"] for s in trained),
  }

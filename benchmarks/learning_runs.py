"""Running the learning-efficiency benchmark: the config, one (arm, seed) run in a worker subprocess
(train for the budget, snapshot the trainable weights, score every snapshot on the held-out
prompts), and the queue of workers. See ``benchmarks.learning_efficiency`` for what a run measures.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .report import ROOT, json_safe  # noqa: E402
from .schedules import NamedSchedule, parse_schedule  # noqa: E402

REPO = ROOT.parent
DEFAULT_CONFIG = "configs/quickstart.yaml"  # the shapes-task config
EVAL_SEED = 1000  # the held-out noise of every snapshot of every arm
#: --set keys the benchmark controls itself
RESERVED = ("model.schedule", "seed_everything", "model.seed", "data.seed")
#: what every run's LightningCLI gets besides the config: no logger, checkpoints, callbacks or progress
#: output, no held-out loop inside the timed fit; the budget (not epochs or steps) ends training
QUIET_TRAINER = ["--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                 "--trainer.max_steps=-1", "--trainer.max_epochs=1000000", "--trainer.num_sanity_val_steps=0",
                 "--trainer.limit_val_batches=0"]


def resolve_config(path: str) -> tuple[str, Path]:
    """(the name recorded in the settings: relative to the repository when inside it, the absolute path);
    a relative path is looked up from the working directory, then from the repository root."""
    p = Path(path)
    if not p.is_absolute() and not p.is_file() and (REPO / p).is_file():
        p = REPO / p
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    p = p.resolve()
    try:
        return p.relative_to(REPO).as_posix(), p
    except ValueError:
        return str(p), p



def parse_sets(sets: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for s in sets:
        key, eq, value = s.partition("=")
        key = key.strip().lstrip("-")
        if not eq or not key:
            raise ValueError(f"--set {s!r}: write KEY=VALUE, e.g. --set data.prompts_per_step=4")
        if any(key == r or key.startswith(r + ".") for r in RESERVED):
            raise ValueError(f"--set {key}: the benchmark sets {key.split('.')[0] if key.startswith('seed') else key} "
                             f"itself (arms via --arms/--preset, seeds via --seeds)")
        out.append((key, value))
    return out



def build_cli(config_path: str, sets: Sequence[tuple[str, str]], extra: Sequence[str] = ()) -> Any:
    """The module, datamodule and trainer of ``config_path`` with ``--set`` overrides and ``extra``
    arguments, built by the library's CLI (``cli.main(run=False)``): no weights trained, nothing written."""
    from pro_grpo_lightning.cli import main as cli_main

    args = ["--config", config_path, *QUIET_TRAINER, *extra, *(f"--{k}={v}" for k, v in sets)]
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the CLI takes ``args`` only (it warns if argv has more)
        return cli_main(args, run=False, save_config=False)


def read_config(path: str, sets: Sequence[tuple[str, str]]) -> tuple[int, Any]:
    """(T, the config's schedule object) of a shapes-task config with ``--set`` applied, from the
    module the CLI builds; a config whose rewards hold no ``ShapesReward`` is refused (the held-out
    evaluation scores the shapes task)."""
    from pro_grpo_lightning.rewards.shapes import ShapesReward

    module = build_cli(path, sets).model
    rewards = getattr(module.rewards, "rewards", [])
    if not any(isinstance(r, ShapesReward) for r in rewards):
        names = [type(r).__name__ for r in rewards]
        raise ValueError(f"{path}: not a shapes-task config (model.rewards is {names}, no ShapesReward); "
                         f"the held-out evaluation scores the shapes task")
    return int(module.backend.num_steps), module.schedule


# ---- one run (the worker) -------------------------------------------------------------------------------
def make_recorder(budget_s: float, every_s: float, max_rollouts: int | None,
                  clock: Callable[[], float] = time.perf_counter):
    """A Lightning callback recording the training wall time, the per-rollout log and weight snapshots
    (see the module docstring). Built in a function so that importing this file needs no Lightning."""
    import lightning.pytorch as pl

    def trainable(module: Any) -> dict[str, Any]:
        return {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters() if p.requires_grad}

    class BudgetRecorder(pl.Callback):
        def __init__(self) -> None:
            self.snapshots: list[dict[str, Any]] = []
            self.rows: list[dict[str, Any]] = []
            self.stopped_by = "data"  # "budget" | "max_rollouts" | "data" (epochs ran out)
            self.excluded = 0.0
            self._prev: dict[str, Any] | None = None  # state after the last rollout, if not snapshotted

        def wall(self, now: float) -> float:
            return now - self.t0 - self.excluded

        def _snap(self, kind: str, rollouts: int, wall: float, params: dict[str, Any]) -> None:
            self.snapshots.append({"kind": kind, "rollouts": rollouts, "wall_s": wall,
                                   "within_budget": wall <= budget_s, "params": params})

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.t0 = clock()
            enter = clock()
            self.next_snap = every_s
            self._snap("start", int(module.rollouts_done), 0.0, trainable(module))
            self.excluded += clock() - enter

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            enter = clock()
            wall = self.wall(enter)
            r = int(module.rollouts_done)
            row: dict[str, Any] = {"rollouts": r, "wall_s": wall}
            for src in (trainer.callback_metrics, trainer.logged_metrics):
                for key, val in src.items():
                    if (key == "reward/mean" or key.startswith(("compute/", "time/", "train/"))) and key not in row:
                        row[key] = float(val)
            self.rows.append(row)
            if wall > budget_s:
                # this rollout ended past the budget: the weights of the budget are the previous ones
                if self._prev is not None:
                    self._snap("budget", **self._prev)
                self._snap("end", r, wall, trainable(module))
                self.stopped_by, trainer.should_stop = "budget", True
                self._prev = None
            elif max_rollouts is not None and r >= max_rollouts:
                self._snap("end", r, wall, trainable(module))
                self.stopped_by, trainer.should_stop = "max_rollouts", True
                self._prev = None
            elif wall >= self.next_snap:
                self._snap("periodic", r, wall, trainable(module))
                self.next_snap = (math.floor(wall / every_s) + 1) * every_s
                self._prev = None
            else:
                self._prev = {"rollouts": r, "wall": wall, "params": trainable(module)}
            self.excluded += clock() - enter

        def on_train_end(self, trainer: Any, module: Any) -> None:
            if self._prev is not None:  # the data ran out between snapshots
                self._snap("end", **self._prev)
                self._prev = None

    return BudgetRecorder()


def evaluate_heldout(backend: Any, samples: int, seed: int, n_prompts: int | None) -> dict[str, float]:
    """``evaluate_shapes`` on the held-out prompts (the first ``n_prompts`` only, for quick runs)."""
    from pro_grpo_lightning.tasks.shapes_eval import evaluate_shapes

    return evaluate_shapes(backend, "heldout", samples_per_prompt=samples, seed=seed, max_prompts=n_prompts)




def cli_extra(task: dict[str, Any]) -> list[str]:
    """The LightningCLI arguments of one run besides the config and ``--set``: its seed and schedule."""
    from pro_grpo_lightning.data import PromptDataModule

    from .learning_arms import schedule_init

    s = task["settings"]
    seed = int(s["seed"])
    sched = parse_schedule(s["spec"]).schedule
    args = [f"--seed_everything={seed}", f"--model.seed={seed}", "--model.samples.every_n_rollouts=0",
            "--model.schedule=" + json.dumps(schedule_init(sched))]
    if "seed" in inspect.signature(PromptDataModule.__init__).parameters:
        args.append(f"--data.seed={seed}")
    return args


def run_one(task: dict[str, Any]) -> dict[str, Any]:
    """Train one (arm, seed) for the budget, evaluate its snapshots, write its run file."""
    import torch

    torch.set_num_threads(1)
    s = task["settings"]
    t_build = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    cli = build_cli(task["config_path"], [tuple(kv) for kv in s["set"]], cli_extra(task))
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    want = parse_schedule(s["spec"]).schedule
    got = module.schedule
    if (type(got), got.sizes(), got.checkpoints, got.rule) != (type(want), want.sizes(), want.checkpoints, want.rule):
        raise RuntimeError(f"the CLI built {got!r}, not the arm's {want!r}")
    recorder = make_recorder(float(s["budget_s"]), float(s["snapshot_every_s"]), s["max_rollouts"])
    trainer.callbacks.append(recorder)
    build_s = time.perf_counter() - t_build
    t_fit = time.perf_counter()
    trainer.fit(module, data)
    fit_s = time.perf_counter() - t_fit

    t_eval = time.perf_counter()
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    final = {n: p.detach().clone() for n, p in params.items()}
    module.eval()
    curve = []
    with torch.no_grad():
        for snap in recorder.snapshots:
            for n, v in snap["params"].items():
                params[n].copy_(v.to(params[n].device))
            res = evaluate_heldout(module.backend, int(s["eval_samples"]), EVAL_SEED, s["eval_prompts"])
            curve.append({k: snap[k] for k in ("kind", "rollouts", "wall_s", "within_budget")}
                         | {k: res[k] for k in ("reward", "exact", "colour", "count", "shape", "position", "n")})
        for n, v in final.items():
            params[n].copy_(v)
    eval_s = time.perf_counter() - t_eval
    run = {"arm": task["arm"], "spec": s["spec"], "seed": s["seed"], "settings": s,
           "schedule": repr(module.schedule), "stopped_by": recorder.stopped_by,
           "rollouts_total": recorder.rows[-1]["rollouts"] if recorder.rows else 0,
           "wall_total_s": recorder.rows[-1]["wall_s"] if recorder.rows else 0.0,
           "callback_s": recorder.excluded, "build_s": build_s, "fit_s": fit_s, "eval_s": eval_s,
           "load_average": {"start": load_start, "end": os.getloadavg() if hasattr(os, "getloadavg") else None},
           "train_log": recorder.rows, "curve": curve}
    path = Path(task["run_file"])
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json_safe(run), indent=1) + "\n")
    os.replace(tmp, path)  # atomic: an interrupted run leaves no file, so it reruns
    return run


# ---- orchestration ---------------------------------------------------------------------------------------
def run_settings(args: argparse.Namespace, arm: NamedSchedule, seed: int, config_sha: str) -> dict[str, Any]:
    """What a run file must match to be reused."""
    return {"config": args.config, "config_sha256": config_sha, "arm": arm.name, "spec": arm.spec, "seed": seed,
            "budget_s": args.budget_s, "snapshot_every_s": args.snapshot_every_s, "eval_samples": args.eval_samples,
            "eval_prompts": args.eval_prompts, "eval_seed": EVAL_SEED, "max_rollouts": args.max_rollouts,
            "set": [list(kv) for kv in args.sets], "jobs": args.jobs}


def existing_run(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        run = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return run if run.get("settings") == json.loads(json.dumps(settings)) else None


def run_queue(tasks: list[dict[str, Any]], jobs: int, log: Callable[[str], None]) -> list[str]:
    """Run the tasks (in order) as worker subprocesses, ``jobs`` at a time. Returns failures."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    pending, running, failures = list(tasks), [], []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                task = pending.pop(0)
                logf = open(task["log_file"], "w")
                proc = subprocess.Popen([sys.executable, "-m", "benchmarks.learning_efficiency", "--worker",
                                         json.dumps(task)], cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT)
                running.append((proc, task, logf, time.perf_counter()))
                log(f"start {task['arm']} seed {task['settings']['seed']} (pid {proc.pid})")
            time.sleep(0.2)
            for item in list(running):
                proc, task, logf, t0 = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                logf.close()
                name = f"{task['arm']} seed {task['settings']['seed']}"
                if proc.returncode == 0 and Path(task["run_file"]).exists():
                    log(f"done  {name} in {time.perf_counter() - t0:.0f} s")
                else:
                    tail = Path(task["log_file"]).read_text(errors="replace")[-2000:]
                    failures.append(f"{name}: exit {proc.returncode}, log {task['log_file']}:\n{tail}")
                    log(f"FAILED {name} (exit {proc.returncode}); log {task['log_file']}")
    finally:
        for proc, _, logf, _ in running:  # interrupted: end only the workers this process started
            proc.terminate()
            proc.wait()
            logf.close()
    return failures

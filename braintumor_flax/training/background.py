"""Start, watch and stop a long run in the background (docs/long_run.md).

    python -m braintumor_flax.training.background start --data-dir ../shared/data   # or resume: the same command
    python -m braintumor_flax.training.background status
    python -m braintumor_flax.training.background stop        # SIGTERM: saves the state, then exits

`start` runs `train.py --recipe RECIPE --run-dir runs/RECIPE` under `nohup nice -n 19` (other work goes on
beside it), its output appended to runs/RECIPE/train.log, its pid in runs/RECIPE/train.pid. It refuses while
the run's lock is held (`run_files.RunLock`: a copy is training it); the training process takes that lock
itself too, so two copies never train one run. The run resumes from its saved state, or starts when there is
none (a missing folder included).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from braintumor_flax.paths import PROJECT_ROOT
from braintumor_flax.training.long_run import LOCK_FILE, PROGRESS_FILE
from braintumor_flax.training.run_files import RunLock

DEFAULT_RECIPE = "shared-long-128"
LOG_FILE, PID_FILE = "train.log", "train.pid"


def run_dir_of(recipe: str, run_dir: Path | None) -> Path:
    return run_dir if run_dir is not None else PROJECT_ROOT / "runs" / recipe


def start(recipe: str, run_dir: Path, data_dir: Path | None, extra: list[str]) -> int:
    """Launch the run in the background; its pid (SystemExit when a copy is already training it)."""
    lock = RunLock(run_dir / LOCK_FILE)
    if lock.held_elsewhere():
        raise SystemExit(f"{run_dir}: already running (pid {lock.holder()}); `status` shows its progress")
    starting = launched_pid(run_dir)
    if starting is not None:  # launched, not yet holding its lock (still importing, or preparing its data)
        raise SystemExit(f"{run_dir}: already starting (pid {starting}); `status` shows its progress")
    run_dir.mkdir(parents=True, exist_ok=True)
    command = ["nohup", "nice", "-n", "19", sys.executable, str(PROJECT_ROOT / "train.py"), "--recipe", recipe,
               "--run-dir", str(run_dir), *(["--data-dir", str(data_dir)] if data_dir else []), *extra]
    with open(run_dir / LOG_FILE, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log.flush()
        # A session of its own: no hang-up or Ctrl-C from the shell that started it reaches it.
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    (run_dir / PID_FILE).write_text(f"{process.pid}\n")
    return process.pid


def launched_pid(run_dir: Path) -> int | None:
    """The pid in the run's pid file if that process is alive and is this run's train.py (not a reused pid)."""
    try:
        pid = int((run_dir / PID_FILE).read_text().strip())
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
    return pid if not zombie and str(run_dir).encode() in cmdline else None


def status_text(run_dir: Path) -> str:
    """The run's progress as lines of text (whether a process trains it, epoch, step, figures, ETA)."""
    lock = RunLock(run_dir / LOCK_FILE)
    running = lock.held_elsewhere()
    lines = [f"{run_dir}: {'running, pid ' + str(lock.holder()) if running else 'not running'}"]
    path = run_dir / PROGRESS_FILE
    if not path.is_file():
        return "\n".join([*lines, "no progress yet (never started, or still preparing its data)"])
    p = json.loads(path.read_text())
    eta = p.get("eta_s")
    lines.append(f"status {p['status']} (updated {p['updated_at']}), epoch {p['epoch']}/{p['epochs']}, "
                 f"step {p['step']}/{p['total_steps']}, elapsed {p['elapsed_s'] / 3600:.2f} h, "
                 f"ETA {'?' if eta is None else f'{eta / 3600:.2f} h'}, {p.get('ms_per_image_step')} ms an image "
                 f"per step, last state at step {p.get('last_state_step')} ({p.get('last_state_saved_at')}), "
                 f"session {p.get('sessions')}")
    current = p.get("current_epoch") or {}
    if current.get("train_loss") is not None:
        lines.append(f"  this epoch so far: train loss {current['train_loss']:.4f}, "
                     f"mask loss {current['train_seg_loss']:.4f}")
    for h in p.get("history", []):
        lines.append(f"  epoch {h['epoch']}: train loss {h['train_loss']:.4f}, val tumour {h['val_tumor_accuracy']:.4f}"
                     f", view {h['val_view_accuracy']:.4f}, Dice {h['val_dice_tumour']:.4f}"
                     + ("  (kept)" if h["epoch"] == p.get("best_epoch") else ""))
    if p.get("checkpoint"):
        lines.append(f"checkpoint: {p['checkpoint']}")
    return "\n".join(lines)


def stop(run_dir: Path, *, kill: bool = False) -> int:
    """SIGTERM (the run saves its state after the current step and exits) or SIGKILL the training process."""
    lock = RunLock(run_dir / LOCK_FILE)
    if not lock.held_elsewhere() or lock.holder() is None:
        raise SystemExit(f"{run_dir}: not running")
    pid = int(lock.holder())
    os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    return pid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("start", "status", "stop"))
    p.add_argument("--recipe", default=DEFAULT_RECIPE)
    p.add_argument("--run-dir", type=Path, default=None, help="default runs/RECIPE")
    p.add_argument("--data-dir", type=Path, default=None, help="start: dataset folder (default ../shared/data)")
    p.add_argument("--kill", action="store_true", help="stop: SIGKILL instead of SIGTERM (loses the unsaved steps)")
    args, extra = p.parse_known_args(argv)  # start: anything else goes to train.py (e.g. --save-every-min 5)
    run_dir = run_dir_of(args.recipe, args.run_dir)
    if args.command == "start":
        pid = start(args.recipe, run_dir, args.data_dir, extra)
        print(f"started pid {pid}: log {run_dir / LOG_FILE}; `python -m braintumor_flax.training.background status`")
    elif args.command == "status":
        print(status_text(run_dir))
    else:
        print(f"sent {'SIGKILL' if args.kill else 'SIGTERM'} to pid {stop(run_dir, kill=args.kill)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

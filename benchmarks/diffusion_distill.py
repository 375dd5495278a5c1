"""Diffusion distillation through the pipeline: a many-step teacher vs. few-step students.

Runs ``kdflow run`` on a declared diffusion pipeline (default ``configs/digits-diffusion.yaml``
with the larger budgets below) in a copy of the project under ``--workdir``, once per student loss
(``--losses``); prepare, teachers, select, condense and logits are computed once and ``Cached``
for the other losses (same fingerprints), so every student learns from the same teacher and the
same DDIM-trajectory cache. Each run's ``evaluate`` stage scores the teacher at 1/2/4/10/50 DDIM
steps and the student at its declared 1/2/4 steps on the same reference images with the same
noise: FID, precision, recall and class coverage in the penultimate features of a ConvNet trained
on half of the test split (**not Inception FID**), and milliseconds per image at batch 1.

The baseline is the teacher of the same run. Reported per loss: the FID-vs-steps table, the
student's 1-step FID relative to the teacher's 4- and 50-step FID, and the 1-step speed-up over 50
DDIM steps; the goal of issue 14 is a 1-step student below the teacher's 4-step FID, within 1.5x
of its 50-step FID, and >= 10x faster than 50 steps.

The table comes from one joint evaluation after the runs (``kdflow.tracks.diffusion.evaluation``:
one feature classifier, one reference set, one noise batch, the teacher scored once, every
student's folder kept under ``<workdir>/students/<loss>``); ``--joint-only`` redoes just that from
an earlier run's folders. Run from the repository root::

    .venv/bin/python benchmarks/diffusion_distill.py --out diffusion_distill.json      # ~30 min on a busy 2-core CPU
    .venv/bin/python benchmarks/diffusion_distill.py --quick                           # the CI config as is, ~3 min
    .venv/bin/python benchmarks/diffusion_distill.py --data fashion --out fashion.json  # configs/fashion-mnist-dmd.yaml, dmd

``--data fashion`` runs ``configs/fashion-mnist-dmd.yaml`` as it is (its own budgets; the ``dmd``
student by default): 10,000 Fashion-MNIST test images, of which 5,000 train the feature classifier,
2,500 are the reference and 2,500 are the held-out real sample whose FID is the noise floor; every
model generates 2,500 images per step count. ``--joint-only --workdir <project copy>`` scores the
folders of an earlier run of the config (``<workdir>/students/<loss>``: copy its ``student`` folder
there) without training anything. For trials of student settings on one run's teacher and cache,
``--students-only --steps 1`` scores just the students' 1-step samples against the same reference
(~35 s per student instead of ~8 min with the teacher's 50-step sampling)::

    kdflow stage student -c configs/fashion-mnist-dmd.yaml -s student.loss.ema=0.99   # in the copy
    cp -r <copy>/artifacts/fashion-mnist-dmd/student <copy>/students/ema
    .venv/bin/python benchmarks/diffusion_distill.py --data fashion --joint-only --workdir <copy> \
        --losses ema --students-only --steps 1
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET = [  # the benchmark's budgets on top of the config (digits 16x16)
    "data.test_fraction=0.2",
    "teachers[0].args={channels: [16, 32], layers_per_block: 1, norm_groups: 8, prediction_type: v_prediction}",
    "teachers[0].train={epochs: 40, lr: 0.002, batch_size: 64, patience: null}",
    "condense.samples=1024", "condense.teacher_steps=50", "condense.states=10",
    "logits.shard_rows=256",
    "evaluate.latency_repeats=5",
]
LOSSES = {
    "diffusion_regression": ["student.loss={name: diffusion_regression, all_states: true}",
                             "student.train={epochs: 12, lr: 0.0005, batch_size: 64, patience: null}"],
    "consistency": ["student.loss={name: consistency, ema: 0.95}",
                    "student.train={epochs: 12, lr: 0.0005, batch_size: 64, patience: null}"],
    "dmd": ["student.loss={name: dmd, fake_updates: 2, fake_lr: 0.001, regression_weight: 0.25}",
            "student.train={epochs: 12, lr: 0.0003, batch_size: 64, patience: null}"],
}

DATA = {  # what --data runs: the pipeline file, its default students, whether LOSSES' overrides apply
    "digits": {"config": "configs/digits-diffusion.yaml", "losses": ",".join(LOSSES), "losses_extra": True},
    "fashion": {"config": "configs/fashion-mnist-dmd.yaml", "losses": "dmd", "losses_extra": False},
}


def run_pipeline(root: Path, config: str, overrides: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    args = [sys.executable, "-m", "kdflow.cli", "run", "-c", config]
    for o in overrides:
        args += ["-s", o]
    t0 = time.perf_counter()
    done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"kdflow run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0, done.stdout + done.stderr


def stage_times(log: str) -> dict[str, str]:
    out = {}
    for line in log.splitlines():
        parts = [p.strip() for p in line.strip("│ ").split("│")]
        if len(parts) == 3 and parts[0] in ("prepare", "teachers", "select", "condense", "logits", "student", "evaluate"):
            out[parts[0]] = f"{parts[1]} {parts[2]}s" if parts[2] else parts[1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=sorted(DATA), default="digits",
                    help="digits: the CI config with BUDGET; fashion: configs/fashion-mnist-dmd.yaml as it is")
    ap.add_argument("--config", help="pipeline file (default: by --data)")
    ap.add_argument("--losses", help="student losses, comma-separated (default: by --data); with --joint-only the "
                    "student folders under --students")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kdflow-diffusion-bench"))
    ap.add_argument("--quick", action="store_true", help="the config's own budgets (CI size)")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the joint evaluation")
    ap.add_argument("--joint-only", action="store_true", help="only the joint evaluation of an earlier --workdir")
    ap.add_argument("--students", type=Path, help="student folders by loss (default <workdir>/students)")
    ap.add_argument("--students-only", action="store_true", help="skip the teacher's rows (and the goal lines)")
    ap.add_argument("--steps", help="the students' step counts to score, comma-separated (default: their declared steps)")
    a = ap.parse_args()
    a.config = a.config or DATA[a.data]["config"]
    a.losses = a.losses or DATA[a.data]["losses"]
    unknown = sorted(set(a.losses.split(",")) - set(LOSSES))
    if unknown and not a.joint_only:  # --joint-only: the names of folders under --students
        ap.error(f"--losses: unknown {unknown} (known: {', '.join(LOSSES)})")

    root = a.workdir
    if not a.joint_only:
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        for item in ("kdflow", "tasks", "schemas", "flows", "configs"):
            shutil.copytree(REPO / item, root / item, ignore=shutil.ignore_patterns("__pycache__"))
    budget = [] if a.quick or a.data != "digits" else BUDGET
    extra = DATA[a.data]["losses_extra"]
    results: dict[str, dict] = {}
    students = a.students or root / "students"
    if not a.joint_only:
        for loss in a.losses.split(","):
            seconds, log = run_pipeline(root, a.config, budget + (LOSSES[loss] if extra else []) + a.set)
            art = pipeline_dir(root)
            shutil.copytree(art / "student", students / loss)
            results[loss] = {"seconds": seconds, "stages": stage_times(log),
                             "pipeline_goal": json.loads((art / "evaluate/metrics.json").read_text())["goal"]}
            print(f"{loss}: {seconds:.0f}s, stages {results[loss]['stages']}", flush=True)
    steps = tuple(int(n) for n in a.steps.split(",")) if a.steps else None
    joint = joint_evaluation(pipeline_dir(root), students, a.losses.split(","), a.threads,
                             teacher=not a.students_only, steps=steps)
    print_table(joint)
    if a.out:
        a.out.write_text(json.dumps({"config": a.config, "budget": budget, "losses": LOSSES, "runs": results,
                                     "joint": joint}, indent=1) + "\n")


def pipeline_dir(root: Path) -> Path:
    return next(p for p in (root / "artifacts").iterdir() if p.is_dir())


def joint_evaluation(art: Path, students: Path, losses: list[str], threads: int, teacher: bool = True,
                     steps: tuple[int, ...] | None = None) -> dict:
    """Teacher once (unless ``teacher`` is false), then every student at ``steps`` (default: its
    declared steps), against one reference (same classifier, noise, classes)."""
    import torch

    from kdflow.tracks import get_track
    from kdflow.tracks.diffusion import evaluation as ev

    torch.set_num_threads(threads)
    track = get_track("diffusion")
    test = track.load(art / "prepare").split("test")
    chosen = json.loads((art / "select/chosen.json").read_text())["teachers"][0]
    t0 = time.perf_counter()
    ref = ev.reference(test.features, test.labels, test.num_classes)
    out = {**ref.metrics, "seconds_reference": time.perf_counter() - t0, "teacher": {}, "students": {}}
    pictures = {}
    if teacher:
        model = track.load_model(art / "teachers" / chosen)
        out["teacher"], grids = ev.score_model(model, ev.TEACHER_STEPS, ref, latency_repeats=5, latency_threads=threads)
        pictures = {"samples_teacher_50step": grids["50"], "samples_teacher_4step": grids["4"]}
    for loss in losses:
        model = track.load_model(students / loss)
        out["students"][loss], grids = ev.score_model(model, steps or tuple(model.steps), ref, latency_repeats=5,
                                                      latency_threads=threads)
        if "1" in grids:
            pictures[f"samples_{loss}_1step"] = grids["1"]
        if teacher:
            out["students"][loss]["goal"] = ev.goal({"teacher": out["teacher"], "student": out["students"][loss]})
    ev.write_grids(students.parent / "figures", pictures)
    return out


def print_table(joint: dict) -> None:
    print(f"\n{joint['feature_space']}\nreference: {joint['n_reference']} test images; {joint['n_generated']} images per "
          f"model and step count; held-out real images (as many): FID {joint['fid_real_floor']:.3f} (the floor); "
          f"classifier accuracy {joint['classifier_accuracy']:.3f}\n")
    print(f"{'model':28s} {'steps':>5s} {'FID':>8s} {'prec':>6s} {'recall':>6s} {'cover':>6s} {'cls-acc':>7s} {'ms/img b1':>9s}")
    r = joint["real"]
    print(f"{'real (held-out)':28s} {'':>5s} {r['fid']:8.3f} {r['precision']:6.3f} {r['recall']:6.3f} {r['coverage']:6.3f} "
          f"{r['class_accuracy']:7.3f}")
    rows = [("teacher (DDIM)", joint["teacher"]["steps"])] if joint["teacher"] else []
    rows += [(f"student {k}", v["steps"]) for k, v in joint["students"].items()]
    for label, steps in rows:
        for n, r in steps.items():
            print(f"{label:28s} {n:>5s} {r['fid']:8.3f} {r['precision']:6.3f} {r['recall']:6.3f} {r['coverage']:6.3f} "
                  f"{r.get('class_accuracy', float('nan')):7.3f} {r['latency_ms_b1']:9.2f}")
    print()
    for loss, r in joint["students"].items():
        g = r.get("goal")
        if not g:
            continue
        print(f"{loss:22s} 1-step FID {g['student_1step_fid']:.3f} vs teacher 4-step {g['teacher_4step_fid']:.3f} "
              f"(beats: {g['beats_teacher_4step']}), {g['fid_ratio_to_teacher_50step']:.2f}x teacher 50-step "
              f"{g['teacher_50step_fid']:.3f}, {g['speedup_vs_50step_b1']:.1f}x faster than 50 steps")


if __name__ == "__main__":
    main()

"""The default job's kind accuracy against training wall time: does `python train.py` draw the condition's object?

Not part of the paper (DESIGN throughout). Runs the default job (`train.py`, its 32 px preset, plus any flags
given after `--`) in segments of `--every` steps, each segment a `--resume` of the last, and after each one
scores the checkpoint with experiments/kinds.py on held-out pages: kind accuracy = P[the kind classifier
names the condition's true kind for a sample] at guidance 0.5 (chance 1/8). Wall seconds are the training
processes' own (start-up, the one-off conditioning cache, training and their grids), evaluation excluded.
Writes OUT/curve.json and, with matplotlib, OUT/curve.png; `--peer FILE` adds experiments/peer.py's
--json rows (the peer given the kind outright) to the plot.

    python experiments/job_curve.py --out runs/curve --every 1000 --segments 4
    python experiments/job_curve.py --out runs/curve --peer runs/peer.json --peer-rate 34 --plot-only   # redraw
    python experiments/job_curve.py --wall-log runs/tiny/log.jsonl --plot-only    # ours at an uninterrupted run's seconds
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kinds  # noqa: E402  (experiments/kinds.py)
import outputs  # noqa: E402  (experiments/outputs.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plot(rows, peer, path, peer_rate=0.0, wall=None):
    """Kind accuracy against training minutes: the job (at its segments' seconds, or at wall[step], an
    uninterrupted run's seconds), and the peer when given (at its own seconds, or at images / peer_rate when it
    ran beside other work and peer_rate is its idle img/s). Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([(wall[r["step"]] if wall else r["train_s"]) / 60 for r in rows], [r["sample_accuracy"] for r in rows], "o-",
            label="ours: python train.py (toy encoder tokens)")
    if peer:
        ax.plot([(r["images"] / peer_rate if peer_rate else r["train_s"]) / 60 for r in peer], [r["accuracy"] for r in peer], "s--",
                label="peer: CFG Unet, kind given outright")
    ax.axhline(0.125, color="grey", lw=0.8, ls=":", label="chance (1/8)")
    ax.axhline(0.6, color="grey", lw=0.8, ls="-.", label="goal 0.6")
    ax.axvline(10, color="black", lw=0.8, ls=":", label="the default job's budget (10 min)")
    ax.set(xlabel="training wall minutes (2 CPU cores)", ylabel="kind accuracy at w = 0.5", ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description="The default job's kind accuracy against wall time.")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "curve"), help="run folder (runs/curve)")
    ap.add_argument("--every", type=int, default=1000, help="steps per segment (1000)")
    ap.add_argument("--segments", type=int, default=4, help="segments (4)")
    ap.add_argument("--pages", type=int, default=64, help="held-out conditions per evaluation (64)")
    ap.add_argument("--n", type=int, default=4, help="samples per condition (4)")
    ap.add_argument("--peer", default="", help="experiments/peer.py --json output to draw beside ours")
    ap.add_argument("--peer-rate", type=float, default=0.0, help="the peer's idle img/s: place its points at "
                    "images / rate, for a peer run beside other work (0: its own training seconds)")
    ap.add_argument("--wall-log", default="", help="log.jsonl of an uninterrupted `train.py` of the same job: "
                    "draw ours at its elapsed seconds at each step (segments pay extra start-ups)")
    ap.add_argument("--plot-only", action="store_true", help="redraw OUT/curve.png from OUT/curve.json")
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if min(a.every, a.segments, a.pages, a.n) < 1:
        ap.error("--every, --segments, --pages and --n must be >= 1")
    if a.peer_rate < 0:
        ap.error(f"--peer-rate must be >= 0, got {a.peer_rate}")
    bad = outputs.output_error("--out", a.out, folder=True)
    if bad:
        ap.error(bad)
    if a.peer and not os.path.isfile(a.peer):
        ap.error(f"--peer {a.peer}: no such file")
    if a.wall_log and not os.path.isfile(a.wall_log):
        ap.error(f"--wall-log {a.wall_log}: no such file")
    peer = json.load(open(a.peer))["rows"] if a.peer else None
    wall = {r["step"]: r["elapsed_s"] for r in map(json.loads, open(a.wall_log)) if "elapsed_s" in r} \
        if a.wall_log else None
    path = os.path.join(a.out, "curve.json")
    if a.plot_only and not os.path.isfile(path):
        ap.error(f"--plot-only: no {path}")
    steps = [r["step"] for r in json.load(open(path))["rows"]] if a.plot_only else \
        [k * a.every for k in range(1, a.segments + 1)]
    missing = [s for s in steps if wall is not None and s not in wall]
    if missing:   # before any training: the segments' work would be lost to a one-line error
        ap.error(f"--wall-log {a.wall_log} has no elapsed_s at steps {missing}")
    if a.plot_only:
        rows = json.load(open(path))["rows"]
    else:
        os.makedirs(a.out, exist_ok=True)
        net, rep = kinds.train_classifier(os.path.join(ROOT, "runs", "kinds"))
        rows, train_s, run = [], 0.0, os.path.join(a.out, "job")
        for k in range(1, a.segments + 1):
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", run, "--steps", str(k * a.every),
                   "--sample-every", str(a.every), *extra, *(["--resume"] if k > 1 else [])]
            t0 = time.time()
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode:
                sys.exit(f"job_curve.py: {' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
            train_s += time.time() - t0
            scores, _, _ = kinds.evaluate_checkpoint(os.path.join(run, "ckpt.pt"), net, a.pages, a.n)
            rows.append(dict(step=k * a.every, train_s=round(train_s, 1), **scores))
            print(json.dumps(rows[-1]), flush=True)
        with open(path + ".tmp", "w") as f:
            json.dump(dict(command=" ".join(sys.argv), extra=extra, classifier=rep, rows=rows), f, indent=1)
        os.replace(path + ".tmp", path)
    try:
        plot(rows, peer, os.path.join(a.out, "curve.png"), a.peer_rate, wall)
        print(f"wrote {os.path.join(a.out, 'curve.png')}")
    except ImportError:
        print("matplotlib is not installed: no curve.png (pip install matplotlib)")


if __name__ == "__main__":
    from machinery import flags
    flags.survive_lost_output()
    main()

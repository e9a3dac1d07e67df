"""
plot_logs.py - turn the trainer's JSONL logs into PNG figures for comparing runs.

Each log has one JSON object per line:
  {"type": "train", "step", "tokens", "loss", "lr", "norm", "ms", "tok_s", "mfu",
   "expert_usage": [per omni layer: share of the N experts hit], "expert_kl": [per layer]}
  {"type": "eval", "step", "tokens", "val_loss"}
  {"type": "mc_eval", "step", "tokens", "accuracy", "correct", "examples"}   (--mc-eval runs)
Missing keys are tolerated: a point that lacks what a figure needs is left out of that figure,
and a figure nobody has data for is not written. Blank lines and lines of other types are
skipped; a line that is not JSON is skipped with a warning (a log still being written may end
in half a line). When a run was resumed and logged a step again, the later lines win: the
earlier entries from that step on are dropped.

Figures written to --out (each only if some run has its data):
  val_loss_vs_tokens.png   validation loss against tokens seen
  val_loss_vs_time.png     validation loss against wall-clock training time, the cumulative
                           "ms" of the train lines up to the eval's step (eval time excluded)
  train_loss_vs_tokens.png training loss against tokens, raw (faint) and smoothed (EMA)
  expert_usage.png         per run, per omni layer: expert usage share and KL(load||uniform)
  mc_accuracy_vs_step.png  multiple-choice accuracy (--mc-eval) against the step
An eval line without "tokens" takes the tokens of the train line of the same step (or the
nearest earlier one).

Usage:
  python scripts/plot_logs.py --out docs/figures run1/log.jsonl:dense run2/log.jsonl:omni
  (the label after the last ':' is optional; without it the log's folder name is used)
"""

import argparse
import bisect
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def parse_run_arg(arg):
    """'path:label' -> (path, label); a path alone gets its folder name (or file name) as label."""
    path, label = arg, None
    if ":" in arg:
        head, tail = arg.rsplit(":", 1)
        if tail and "/" not in tail and head:
            path, label = head, tail
    if not label:
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        label = parent or os.path.basename(path)
    return path, label


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def keep_latest(entries, step):
    """A step at or before the last one logged means a resumed run: drop entries from it on."""
    if entries and is_number(step) and step <= entries[-1].get("step", -math.inf):
        while entries and entries[-1].get("step", -math.inf) >= step:
            entries.pop()


def read_log(path):
    """Returns (train entries, eval entries, mc_eval entries), each a list of dicts in step order."""
    try:
        f = open(path, "r", encoding="utf-8")
    except OSError as e:
        sys.exit(f"plot_logs.py: cannot open log {path}: {e.strerror}")
    train, evals, mc = [], [], []
    bad = 0
    with f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                print(f"warning: {path}:{lineno}: not a JSON object, skipped", file=sys.stderr)
                continue
            if not isinstance(obj, dict):
                bad += 1
                print(f"warning: {path}:{lineno}: not a JSON object, skipped", file=sys.stderr)
                continue
            kind = obj.get("type")
            if kind == "train":
                keep_latest(train, obj.get("step"))
                train.append(obj)
            elif kind == "eval":
                keep_latest(evals, obj.get("step"))
                evals.append(obj)
            elif kind == "mc_eval":
                keep_latest(mc, obj.get("step"))
                mc.append(obj)
    if not train and not evals:
        print(f"warning: {path}: no train or eval lines", file=sys.stderr)
    return train, evals, mc


class Run:
    def __init__(self, path, label):
        self.path, self.label = path, label
        self.train, self.evals, self.mc = read_log(path)
        # train-line steps, tokens and cumulative wall-clock ms, for looking up evals.
        # "ms" is the time of one step; where lines are several steps apart it stands for each
        # step of the gap; a line without it borrows the last known step time (warned).
        self.steps, self.tokens_at, self.ms_at = [], [], []
        known = [e["ms"] for e in self.train if is_number(e.get("ms"))]
        step_ms = known[0] if known else None
        total_ms, prev_step, borrowed = 0.0, 0, 0
        for e in self.train:
            step = e.get("step")
            if not is_number(step):
                continue
            if is_number(e.get("ms")):
                step_ms = e["ms"]
            else:
                borrowed += 1
            if step_ms is not None:
                total_ms += step_ms * max(1, step - prev_step)
            prev_step = step
            self.steps.append(step)
            self.tokens_at.append(e["tokens"] if is_number(e.get("tokens")) else None)
            self.ms_at.append(total_ms if step_ms is not None else None)
        if borrowed and known:
            print(f"warning: {path}: {borrowed} train lines without 'ms' took the previous "
                  f"line's step time", file=sys.stderr)

    def lookup(self, step, table):
        """Value of table at the last train line with step <= step (None when there is none)."""
        i = bisect.bisect_right(self.steps, step) - 1
        return table[i] if i >= 0 else None

    def train_series(self, key):
        xs, ys = [], []
        for e in self.train:
            if is_number(e.get("tokens")) and is_number(e.get(key)):
                xs.append(e["tokens"])
                ys.append(e[key])
        return xs, ys

    def eval_series(self, by):
        """(x, val_loss) with x = tokens or wall-clock minutes."""
        xs, ys = [], []
        for e in self.evals:
            if not is_number(e.get("val_loss")):
                continue
            step = e.get("step")
            if by == "tokens":
                x = e.get("tokens")
                if not is_number(x) and is_number(step):
                    x = self.lookup(step, self.tokens_at)
                if step == 0 and x is None:
                    x = 0  # the eval before the first step
            else:
                ms = self.lookup(step, self.ms_at) if is_number(step) else None
                x = ms / 60000.0 if ms is not None else None
                if step == 0 and x is None:
                    x = 0.0  # the eval before the first step
            if is_number(x):
                xs.append(x)
                ys.append(e["val_loss"])
        return xs, ys

    def per_layer_series(self, key):
        """key = expert_usage | expert_kl -> (tokens, [layer][point]) over lines that have it."""
        xs, layers = [], []
        for e in self.train:
            vals = e.get(key)
            if not is_number(e.get("tokens")) or not isinstance(vals, list) or not vals:
                continue
            if not all(is_number(v) for v in vals):
                continue
            if layers and len(vals) != len(layers):
                print(f"warning: {self.path}: step {e.get('step')}: {key} has {len(vals)} layers, "
                      f"earlier lines {len(layers)}; line skipped", file=sys.stderr)
                continue
            if not layers:
                layers = [[] for _ in vals]
            xs.append(e["tokens"])
            for layer, v in zip(layers, vals):
                layer.append(v)
        return xs, layers


def ema(ys, beta):
    """Exponential moving average with bias correction (beta = 0: no smoothing)."""
    out, avg = [], 0.0
    for i, y in enumerate(ys):
        avg = beta * avg + (1.0 - beta) * y
        out.append(avg / (1.0 - beta ** (i + 1)) if beta > 0 else y)
    return out


def tokens_axis(ax):
    ax.set_xlabel("tokens")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0), useMathText=True)


def finish(fig, ax, path, title, ylabel, written):
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    written.append(path)


def zoom_to_tail(ax, curves):
    """Loss curves start high: fit the y range to the points after the first 15% of the x span
    (of all runs together) so the differences at the end show; earlier points run off the top."""
    xs_all = [x for xs, _ in curves for x in xs]
    if not xs_all:
        return
    cut = min(xs_all) + 0.15 * (max(xs_all) - min(xs_all))
    tail = [y for xs, ys in curves for x, y in zip(xs, ys) if x >= cut]
    if len(tail) >= 2:
        lo, hi = min(tail), max(tail)
        pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-3
        ax.set_ylim(lo - pad, hi + pad)


def plot_eval(runs, by, path, written):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_data, all_ys = False, []
    for i, run in enumerate(runs):
        xs, ys = run.eval_series(by)
        if xs:
            any_data = True
            all_ys.append((xs, ys))
            ax.plot(xs, ys, marker="o", ms=3, color=f"C{i}",
                    label=f"{run.label} (last {ys[-1]:.4f}, min {min(ys):.4f})")
    if not any_data:
        plt.close(fig)
        return False
    zoom_to_tail(ax, all_ys)
    if by == "tokens":
        tokens_axis(ax)
        finish(fig, ax, path, "validation loss vs tokens", "val loss", written)
    else:
        ax.set_xlabel("training wall-clock (minutes, eval time excluded)")
        finish(fig, ax, path, "validation loss vs wall-clock", "val loss", written)
    return True


def plot_train(runs, beta, path, written):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_data, all_ys = False, []
    for i, run in enumerate(runs):
        xs, ys = run.train_series("loss")
        if xs:
            any_data = True
            smooth = ema(ys, beta)
            all_ys.append((xs, smooth))
            ax.plot(xs, ys, color=f"C{i}", alpha=0.2, lw=0.8)
            ax.plot(xs, smooth, color=f"C{i}", lw=1.6, label=f"{run.label} (EMA {beta:g}: {smooth[-1]:.4f})")
    if not any_data:
        plt.close(fig)
        return False
    zoom_to_tail(ax, all_ys)
    tokens_axis(ax)
    finish(fig, ax, path, "training loss vs tokens", "train loss", written)
    return True


def plot_experts(runs, path, written):
    have = []
    for run in runs:
        usage = run.per_layer_series("expert_usage")
        kl = run.per_layer_series("expert_kl")
        if usage[0] or kl[0]:
            have.append((run, usage, kl))
    if not have:
        return False
    rows = 2
    fig, axes = plt.subplots(rows, len(have), figsize=(5.5 * len(have), 7), squeeze=False,
                             sharex="col")
    for col, (run, usage, kl) in enumerate(have):
        for row, ((xs, layers), name) in enumerate([(usage, "expert usage (share of N hit)"),
                                                    (kl, "KL(load || uniform)")]):
            ax = axes[row][col]
            if not xs:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            cmap = plt.get_cmap("viridis")
            for l, ys in enumerate(layers):
                color = cmap(l / max(1, len(layers) - 1))
                ax.plot(xs, ys, color=color, lw=1.2, label=f"layer {l}")
            ax.set_title(f"{run.label}: {name}" if row == 0 else name)
            ax.grid(True, alpha=0.3)
            if row == 0 and xs:
                ax.set_ylim(0, 1.05)
            if row == rows - 1:
                tokens_axis(ax)
            if layers:
                ax.legend(fontsize=7, ncol=2 if len(layers) > 6 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    written.append(path)
    return True


def plot_mc(runs, path, written):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_data = False
    for i, run in enumerate(runs):
        pts = [(e["step"], e["accuracy"]) for e in run.mc if is_number(e.get("step")) and is_number(e.get("accuracy"))]
        if pts:
            any_data = True
            xs, ys = zip(*pts)
            n = run.mc[-1].get("examples", "?")
            ax.plot(xs, ys, marker="o", ms=3, color=f"C{i}",
                    label=f"{run.label} (last {ys[-1]:.4f}, max {max(ys):.4f}; {n} examples)")
    if not any_data:
        plt.close(fig)
        return False
    ax.set_xlabel("step")
    finish(fig, ax, path, "multiple-choice accuracy vs step", "accuracy (acc_norm)", written)
    return True


def summary(runs):
    print(f"{'run':<20s} {'train lines':>11s} {'last step':>9s} {'tokens':>12s} "
          f"{'minutes':>9s} {'last val':>9s} {'min val':>9s}")
    for run in runs:
        last = run.train[-1] if run.train else {}
        vals = [e["val_loss"] for e in run.evals if is_number(e.get("val_loss"))]
        ms = [m for m in run.ms_at if m is not None]
        minutes = f"{ms[-1] / 60000.0:.1f}" if ms else "?"
        print(f"{run.label:<20s} {len(run.train):>11d} {str(last.get('step', '?')):>9s} "
              f"{str(last.get('tokens', '?')):>12s} {minutes:>9s} "
              f"{(f'{vals[-1]:.4f}' if vals else '-'):>9s} {(f'{min(vals):.4f}' if vals else '-'):>9s}")


def main():
    ap = argparse.ArgumentParser(description="plot omnimoe JSONL training logs to PNG figures")
    ap.add_argument("logs", nargs="+", metavar="LOG[:LABEL]", help="JSONL log, optionally :label")
    ap.add_argument("--out", default="docs/figures", help="folder for the PNGs (created)")
    ap.add_argument("--prefix", default="", help="prefix for the file names, e.g. 'd12_'")
    ap.add_argument("--smooth", type=float, default=0.9,
                    help="EMA factor for the training loss, in [0, 1) (0: none; default 0.9)")
    args = ap.parse_args()
    if not (0.0 <= args.smooth < 1.0):
        sys.exit(f"plot_logs.py: --smooth must be in [0, 1), got {args.smooth}")

    runs = [Run(*parse_run_arg(a)) for a in args.logs]
    os.makedirs(args.out, exist_ok=True)
    out = lambda name: os.path.join(args.out, args.prefix + name)  # noqa: E731

    written = []
    skipped = []
    if not plot_eval(runs, "tokens", out("val_loss_vs_tokens.png"), written):
        skipped.append("val_loss_vs_tokens (no eval lines with val_loss and tokens)")
    if not plot_eval(runs, "time", out("val_loss_vs_time.png"), written):
        skipped.append("val_loss_vs_time (no eval lines with train-line ms before them)")
    if not plot_train(runs, args.smooth, out("train_loss_vs_tokens.png"), written):
        skipped.append("train_loss_vs_tokens (no train lines with loss and tokens)")
    if not plot_experts(runs, out("expert_usage.png"), written):
        skipped.append("expert_usage (no run logs expert_usage or expert_kl)")
    if not plot_mc(runs, out("mc_accuracy_vs_step.png"), written):
        skipped.append("mc_accuracy_vs_step (no mc_eval lines with accuracy)")

    summary(runs)
    for path in written:
        print(f"wrote {path}")
    for what in skipped:
        print(f"skipped {what}")
    if not written:
        sys.exit("plot_logs.py: no figure could be made from these logs")


if __name__ == "__main__":
    main()

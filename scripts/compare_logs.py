#!/usr/bin/env python3
"""compare_logs.py - compares the JSONL logs of two training runs (llmc/logger.h records).

    python3 scripts/compare_logs.py A.jsonl B.jsonl --exact [--steps 11-20]
        every train record of B in the step range must equal A's bit for bit: loss, norm and lr
        (written with %.9g, which round-trips a float32, so equal text = equal bits), and every
        eval record of B (val_loss) must equal A's at the same step.
    python3 scripts/compare_logs.py A.jsonl B.jsonl --loss-tol 0.01 --norm-rtol 0.02 [--steps ..]
        the same records within tolerances: |loss_A - loss_B| <= loss-tol and
        |norm_A - norm_B| <= norm-rtol * |norm_A|; lr must still be equal.
    add --expect-differ to invert the verdict (a negative control: the runs must NOT agree
    within the tolerances).

Prints one line: PASS/FAIL, the label, the number of steps compared and the largest
differences. Exit status 0 on PASS, 1 on FAIL (a missing step is a FAIL).
"""
import argparse
import json
import sys


def read_log(path):
    train, evals = {}, {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            raw = {}
            # keep the text of each number as written, for the bitwise comparison
            for key in ("loss", "norm", "lr", "val_loss"):
                marker = '"%s":' % key
                at = line.find(marker)
                if at >= 0:
                    rest = line[at + len(marker):]
                    end = min([i for i in (rest.find(","), rest.find("}")) if i >= 0])
                    raw[key] = rest[:end]
            rec["_raw"] = raw
            if rec.get("type") == "train":
                train[rec["step"]] = rec
            elif rec.get("type") == "eval":
                evals[rec["step"]] = rec
    return train, evals


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--label", default="")
    ap.add_argument("--steps", default="", help="first-last train steps of B to compare (default: all of B's)")
    ap.add_argument("--exact", action="store_true")
    ap.add_argument("--no-eval", action="store_true", help="do not compare eval records")
    ap.add_argument("--loss-tol", type=float, default=0.0)
    ap.add_argument("--norm-rtol", type=float, default=0.0)
    ap.add_argument("--expect-differ", action="store_true")
    args = ap.parse_args()
    a_train, a_eval = read_log(args.a)
    b_train, b_eval = read_log(args.b)
    steps = sorted(b_train)
    if args.steps:
        lo, hi = (int(x) for x in args.steps.split("-"))
        steps = list(range(lo, hi + 1))
    problems = []
    max_dloss, max_dnorm_rel, mismatched = 0.0, 0.0, 0
    for s in steps:
        if s not in a_train or s not in b_train:
            problems.append("step %d missing in %s" % (s, args.a if s not in a_train else args.b))
            continue
        ra, rb = a_train[s], b_train[s]
        if ra["lr"] != rb["lr"]:
            problems.append("step %d: lr %s vs %s" % (s, ra["_raw"]["lr"], rb["_raw"]["lr"]))
        if ra["loss"] is None or rb["loss"] is None:
            problems.append("step %d: a loss is not finite" % s)
            continue
        dloss = abs(ra["loss"] - rb["loss"])
        dnorm = abs(ra["norm"] - rb["norm"]) / max(abs(ra["norm"]), 1e-30)
        max_dloss, max_dnorm_rel = max(max_dloss, dloss), max(max_dnorm_rel, dnorm)
        if args.exact:
            if ra["_raw"]["loss"] != rb["_raw"]["loss"] or ra["_raw"]["norm"] != rb["_raw"]["norm"]:
                mismatched += 1
                if mismatched <= 3:
                    problems.append("step %d: loss %s vs %s, norm %s vs %s" % (
                        s, ra["_raw"]["loss"], rb["_raw"]["loss"], ra["_raw"]["norm"], rb["_raw"]["norm"]))
        elif dloss > args.loss_tol or dnorm > args.norm_rtol:
            mismatched += 1
    eval_compared = 0
    if args.exact and not args.no_eval:
        lo, hi = (min(steps), max(steps)) if steps else (0, -1)
        for s in sorted(b_eval):
            if not (lo - 1 <= s <= hi):
                continue
            if s not in a_eval:
                problems.append("eval at step %d missing in %s" % (s, args.a))
                continue
            eval_compared += 1
            if a_eval[s]["_raw"]["val_loss"] != b_eval[s]["_raw"]["val_loss"]:
                problems.append("eval step %d: val_loss %s vs %s" % (
                    s, a_eval[s]["_raw"]["val_loss"], b_eval[s]["_raw"]["val_loss"]))
    agree = not problems and mismatched == 0 and len(steps) > 0
    if args.expect_differ:
        missing = [p for p in problems if "missing" in p or "not finite" in p]
        ok = not missing and mismatched > 0
    else:
        ok = agree
    mode = "bitwise" if args.exact else "tol loss %.3g, norm %.3g rel" % (args.loss_tol, args.norm_rtol)
    print("%s: %s: %d steps (%s)%s, max |dloss| %.3g, max norm rel diff %.3g, %d steps outside%s%s" % (
        "PASS" if ok else "FAIL", args.label or (args.a + " vs " + args.b), len(steps), mode,
        ", %d evals" % eval_compared if args.exact and not args.no_eval else "",
        max_dloss, max_dnorm_rel, mismatched,
        " (expected to differ: negative control)" if args.expect_differ else "",
        ("; " + "; ".join(problems[:4])) if problems else ""))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""
Mutation testing of the CPU tests: plants one known bug at a time in a copy of the repo and
checks that the test meant to guard that code fails.

The bugs are data, in dev/mutations/<test binary>.txt (format: dev/mutations/README.md). For each
bug this tool
  1. copies the repo's tracked files (git ls-files; working-tree contents, so uncommitted edits
     count) into a private temp directory, one per parallel worker,
  2. replaces the bug's exact "old" text with its "new" text; the old text must occur exactly
     once, otherwise the bug is STALE (the code moved on: update the pattern, never drop the bug),
  3. builds the test binary with the repo's Makefile (`make -s <test>` in the copy),
  4. runs it from the copy's root (tests read data/ relative to it) and reports
       CAUGHT       the test exits non-zero and every `expect:` line of the bug printed FAIL,
       MISSED       the test passed, or failed without the expected FAIL lines (a test gap),
       TIMEOUT      the test ran past --timeout (counted as caught: CI would not pass either),
       STALE        the old text did not match exactly once,
       BUILD-ERROR  the mutated code does not compile (a broken bug definition),
       GAP          MISSED, by a bug marked `gap:` (a known hole in the tests, said in that line),
       GAP-CLOSED   CAUGHT, by a bug marked `gap:`: the hole is closed, remove the marker.
Before any bug, each test involved is built and run unmutated; a failing baseline aborts.

  python3 dev/mutation_test.py                  all bugs, 2 in parallel
  python3 dev/mutation_test.py -j 4             4 in parallel
  python3 dev/mutation_test.py --only cpu05,dl12  some bugs by id (or repeat --only)
  python3 dev/mutation_test.py --test test_checkpoint   the bugs of one test binary
  python3 dev/mutation_test.py --list           list the bugs, run nothing
  python3 dev/mutation_test.py --check          only check that every pattern matches once (fast)
  python3 dev/mutation_test.py --only fx03 -v   show the test's FAIL lines / build errors

Exit status 0 when every selected bug is CAUGHT, TIMEOUT or GAP, 1 otherwise. Slow (one build per
bug), so it is not part of `make test`; run it after changing a test or the code it guards.
"""
import argparse
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTATIONS_DIR = os.path.join(REPO, "dev", "mutations")
OK_STATUSES = ("CAUGHT", "TIMEOUT", "GAP")
ALL_STATUSES = ["CAUGHT", "TIMEOUT", "GAP", "MISSED", "STALE", "BUILD-ERROR", "GAP-CLOSED"]


# ------------------------------------------------------------------------------------------
# bug definitions

class Mutation:
    def __init__(self, mid, test, source):
        self.id = mid
        self.test = test          # test binary name, from the data file's name
        self.source = source      # "dev/mutations/x.txt:12", for messages
        self.desc = ""
        self.file = None          # repo-relative path of the file to mutate
        self.expect = []          # names of test lines that must print FAIL
        self.gap = ""             # non-empty: a known hole in the tests (what is missing)
        self.edits = []           # [(old, new)], applied in order, each old must match once


def parse_mutation_file(path):
    """Parses one dev/mutations/<test>.txt file into a list of Mutation."""
    test = os.path.splitext(os.path.basename(path))[0]
    rel = os.path.relpath(path, REPO)
    mutations = []
    current = None
    block = None      # None (header), "old" or "new"
    lines_old, lines_new = [], []

    def finish_edit(lineno):
        if current is None or block is None:
            return
        if block == "old":
            sys.exit(f"{rel}:{lineno}: bug '{current.id}': '--- old' block without '--- new'")
        while lines_new and lines_new[-1].strip() == "":
            lines_new.pop()   # blank lines before the next '===' separate bugs
        old = "\n".join(lines_old)
        new = "\n".join(lines_new)
        if old.strip() == "":
            sys.exit(f"{rel}:{lineno}: bug '{current.id}': empty '--- old' block")
        if new == old:
            sys.exit(f"{rel}:{lineno}: bug '{current.id}': '--- new' is the same as '--- old'")
        current.edits.append((old, new))

    def finish_mutation(lineno):
        finish_edit(lineno)
        if current is None:
            return
        if not current.file:
            sys.exit(f"{current.source}: bug '{current.id}' has no 'file:' line")
        if not current.edits:
            sys.exit(f"{current.source}: bug '{current.id}' has no '--- old' / '--- new' blocks")
        mutations.append(current)

    with open(path) as f:
        text = f.read().split("\n")
    for lineno, line in enumerate(text, 1):
        if line.startswith("=== "):
            finish_mutation(lineno)
            mid = line[4:].strip()
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", mid):
                sys.exit(f"{rel}:{lineno}: bug id '{mid}' must be letters, digits, '_', '.' or '-'")
            current, block = Mutation(mid, test, f"{rel}:{lineno}"), None
        elif line == "--- old":
            if current is None:
                sys.exit(f"{rel}:{lineno}: '--- old' before any '=== <id>' line")
            finish_edit(lineno)
            block, lines_old, lines_new = "old", [], []
        elif line == "--- new":
            if block != "old":
                sys.exit(f"{rel}:{lineno}: '--- new' without a preceding '--- old'")
            block = "new"
        elif block is not None and line.startswith("# "):
            # C lines start with '#' too ('#pragma'), so blocks cannot hold comments: refuse what
            # looks like one rather than plant it as code
            sys.exit(f"{rel}:{lineno}: '# ...' inside a '--- {block}' block of bug '{current.id}': comments "
                     f"go at the top of the file or between '=== <id>' and '--- old'")
        elif block == "old":
            lines_old.append(line)
        elif block == "new":
            lines_new.append(line)
        elif line.strip() == "" or line.startswith("#"):
            continue
        elif current is None:
            sys.exit(f"{rel}:{lineno}: expected '=== <id>' or a '#' comment, got: {line}")
        else:
            m = re.match(r"(desc|file|expect|gap):\s?(.*)$", line)
            if not m:
                sys.exit(f"{rel}:{lineno}: expected 'desc:', 'file:', 'expect:', 'gap:' or '--- old', got: {line}")
            key, value = m.group(1), m.group(2).strip()
            if key == "desc":
                current.desc = value
            elif key == "file":
                current.file = value
            elif key == "gap":
                current.gap = value
            else:
                current.expect.append(value)
    finish_mutation(len(text))
    return mutations


def load_mutations():
    if not os.path.isdir(MUTATIONS_DIR):
        sys.exit(f"Error: no bug list directory {MUTATIONS_DIR}")
    mutations, seen = [], {}
    for name in sorted(os.listdir(MUTATIONS_DIR)):
        if not name.endswith(".txt"):
            continue
        for m in parse_mutation_file(os.path.join(MUTATIONS_DIR, name)):
            if m.id in seen:
                sys.exit(f"Error: bug id '{m.id}' defined twice: {seen[m.id]} and {m.source}")
            seen[m.id] = m.source
            mutations.append(m)
    return mutations


# ------------------------------------------------------------------------------------------
# applying a bug

def mutate_text(m, text):
    """Returns (mutated text, None), or (None, why) when a pattern does not match exactly once."""
    for i, (old, new) in enumerate(m.edits):
        count = text.count(old)
        if count != 1:
            first = old.strip().split("\n")[0].strip()
            where = f"edit {i + 1}: " if len(m.edits) > 1 else ""
            return None, f"{where}old text found {count} times in {m.file} (first line: {first[:70]!r})"
        text = text.replace(old, new)
    return text, None


def read_repo_file(rel):
    path = os.path.join(REPO, rel)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()


# ------------------------------------------------------------------------------------------
# building and running in a private copy of the repo

def tracked_files():
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def copy_repo(files, dest):
    for rel in files:
        src = os.path.join(REPO, rel)
        if not os.path.isfile(src):   # deleted in the working tree
            continue
        dst = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)


def clean_env():
    env = dict(os.environ)
    for k in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):
        env.pop(k, None)
    env.setdefault("OMP_NUM_THREADS", "2")   # as CI (.ci/run)
    # parallel tests oversubscribe the cores (the determinism test alone runs 3 threads); threads
    # spinning at OpenMP barriers then slow a 1 s test down to minutes
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


# tests that are scripts (scripts/<test>.sh, or .py) driving a binary: the binary they need
SCRIPT_TESTS = {"test_resume_cpu": "train_omnimoe_cpu", "test_launcher_cpu": "train_omnimoe_cpu",
                "test_plan": "train_omnimoe_cpu"}
# test binaries that also run another binary of the copy (built, mutated, with them)
ALSO_BUILD = {"test_mc_loop": ["train_omnimoe_cpu"]}


def build(workdir, test):
    """Builds the test with the Makefile; returns None or the compiler's error text."""
    targets = [SCRIPT_TESTS.get(test, test)] + ALSO_BUILD.get(test, [])
    for target in targets:
        binary = os.path.join(workdir, target)
        if os.path.exists(binary):
            os.remove(binary)   # always rebuild, whatever the timestamps say
    # NVCC=false: the Makefile's NCCL probe fails at once instead of running nvcc (CPU tests
    # never use it)
    r = subprocess.run(["make", "-s", "NVCC=false"] + targets, cwd=workdir, env=clean_env(),
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not all(os.path.exists(os.path.join(workdir, t)) for t in targets):
        return (r.stdout + r.stderr).strip() or f"make exited {r.returncode}"
    return None


def run_test(workdir, test, timeout):
    """Returns (exit status or None on timeout, stdout + stderr)."""
    command = [os.path.join(".", test)]
    if test in SCRIPT_TESTS:
        py = os.path.exists(os.path.join(workdir, "scripts", f"{test}.py"))
        command = ["python3", f"scripts/{test}.py"] if py else ["bash", f"scripts/{test}.sh"]
    try:
        r = subprocess.run(command, cwd=workdir, env=clean_env(),
                           capture_output=True, timeout=timeout)
        return r.returncode, (r.stdout + r.stderr).decode(errors="replace")
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        return None, out.decode(errors="replace")


def squash(s):
    return " ".join(s.split())


def fail_lines(output):
    """The text after 'FAIL' / 'FAIL:' of each failing line, whitespace squashed."""
    out = []
    for line in output.split("\n"):
        s = line.strip()
        if s.startswith("FAIL") and (len(s) == 4 or s[4] in " :\t"):
            out.append(squash(s[4:].lstrip(" :\t")))
    return out


def names_line(expected, failed):
    """True when a FAIL line starts with the expected name, followed by no more name characters
    (so 'grad_accum_omni' does not match 'grad_accum_omni_bn')."""
    e = squash(expected)
    for f in failed:
        if f.startswith(e) and (len(f) == len(e) or not (f[len(e)].isalnum() or f[len(e)] == "_")):
            return True
    return False


def judge(m, rc, output):
    """Returns (status, detail)."""
    failed = fail_lines(output)
    summary = "; failing: " + (", ".join(f[:60] for f in failed[:6]) if failed else "none")
    if len(failed) > 6:
        summary += f" (+{len(failed) - 6} more)"
    if rc is None:
        return "TIMEOUT", "test ran past the time limit" + summary
    if rc == 0:
        return "MISSED", "test passed (exit 0)"
    missing = [e for e in m.expect if not names_line(e, failed)]
    how = f"exit {rc}" if rc > 0 else f"killed by signal {-rc}"
    if missing:
        return "MISSED", f"{how}, but expected FAIL lines absent: {missing}" + summary
    return "CAUGHT", how + summary


# ------------------------------------------------------------------------------------------
# driver

def main():
    ap = argparse.ArgumentParser(description="Plant known bugs one at a time and check the CPU tests catch them.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--only", action="append", default=[], metavar="ID",
                    help="run only these bug ids (comma-separated or repeated)")
    ap.add_argument("--test", action="append", default=[], metavar="BINARY",
                    help="run only the bugs of this test binary (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the bugs and exit")
    ap.add_argument("--check", action="store_true", help="only check that every pattern matches exactly once")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="bugs built and tested in parallel (default 2)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per test run (default 120)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print FAIL lines and build errors of each bug")
    ap.add_argument("--keep", action="store_true", help="keep the temp copies (their path is printed)")
    args = ap.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # quiet when piped into head
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # still remove the temp copies

    mutations = load_mutations()
    only = {x for arg in args.only for x in arg.split(",") if x}
    unknown = only - {m.id for m in mutations}
    if unknown:
        sys.exit(f"Error: --only: unknown bug id(s) {sorted(unknown)}; see --list")
    tests_known = {m.test for m in mutations}
    for t in args.test:
        if t not in tests_known:
            sys.exit(f"Error: --test {t}: no dev/mutations/{t}.txt; known: {sorted(tests_known)}")
    selected = [m for m in mutations if (not only or m.id in only) and (not args.test or m.test in args.test)]
    if args.jobs < 1:
        sys.exit("Error: -j must be at least 1")

    if args.list:
        for m in selected:
            expect = f"  [expects FAIL: {'; '.join(m.expect)}]" if m.expect else ""
            expect += f"  [known gap: {m.gap}]" if m.gap else ""
            print(f"{m.id:8s} {m.test:18s} {m.file:22s} {m.desc}{expect}")
        print(f"{len(selected)} bugs")
        return 0

    # patterns first: cheap, and a stale one needs no build
    pristine, results, runnable = {}, {}, []
    for m in selected:
        if m.file not in pristine:
            pristine[m.file] = read_repo_file(m.file)
        if pristine[m.file] is None:
            results[m.id] = ("STALE", f"file {m.file} does not exist", 0.0)
            continue
        _, why = mutate_text(m, pristine[m.file])
        if why:
            results[m.id] = ("STALE", why, 0.0)
        else:
            runnable.append(m)

    t_start = time.time()
    print_lock = threading.Lock()

    def report(m, status, detail, seconds):
        results[m.id] = (status, detail, seconds)
        with print_lock:
            print(f"{status:11s} {m.id:8s} {m.test:18s} {m.desc}  ({seconds:.1f} s)", flush=True)
            if status != "CAUGHT" or args.verbose:
                text = detail if args.verbose else detail[:1500]
                print("            " + text.replace("\n", "\n            "), flush=True)

    for m in selected:
        if m.id in results:
            report(m, *results[m.id])

    if args.check:
        stale = [m for m in selected if results.get(m.id, ("",))[0] == "STALE"]
        print(f"{len(selected) - len(stale)} of {len(selected)} bugs match exactly once, {len(stale)} STALE")
        return 1 if stale else 0
    if not runnable:
        return summarize(selected, results, time.time() - t_start)

    root = tempfile.mkdtemp(prefix="omnimoe_mutation_")
    try:
        files = tracked_files()
        workdirs = queue.Queue()
        for w in range(min(args.jobs, len(runnable))):
            d = os.path.join(root, f"w{w}")
            copy_repo(files, d)
            workdirs.put(d)

        # baseline: every test involved must build and pass unmutated, or nothing below means anything
        d = workdirs.get()
        for test in sorted({m.test for m in runnable}):
            err = build(d, test)
            if err:
                sys.exit(f"Error: baseline: {test} does not build unmutated:\n{err[:3000]}")
            rc, out = run_test(d, test, args.timeout)
            if rc != 0:
                failed = fail_lines(out)
                sys.exit(f"Error: baseline: {test} fails unmutated (exit {rc}); failing: {failed[:10]}\n"
                         f"{out[-3000:]}")
            print(f"baseline    {test} builds and passes unmutated", flush=True)
        workdirs.put(d)

        def one(m):
            d = workdirs.get()
            t0 = time.time()
            path = os.path.join(d, m.file)
            try:
                text, _ = mutate_text(m, pristine[m.file])
                with open(path, "w") as f:
                    f.write(text)
                err = build(d, m.test)
                if err:
                    report(m, "BUILD-ERROR", err, time.time() - t0)
                    return
                rc, out = run_test(d, m.test, args.timeout)
                status, detail = judge(m, rc, out)
                if m.gap and status == "MISSED":
                    status, detail = "GAP", f"known gap: {m.gap}; {detail}"
                elif m.gap and status == "CAUGHT":
                    status, detail = "GAP-CLOSED", f"caught now: remove its 'gap:' line; {detail}"
                fails = [l for l in out.split("\n") if l.strip().startswith("FAIL")]
                if args.verbose and fails:
                    detail += "\n" + "\n".join(fails)
                report(m, status, detail, time.time() - t0)
            except Exception as e:   # report and keep going: one broken bug must not hide the rest
                report(m, "BUILD-ERROR", f"{type(e).__name__}: {e}", time.time() - t0)
            finally:
                with open(path, "w") as f:
                    f.write(pristine[m.file])
                workdirs.put(d)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, runnable))
    finally:
        if args.keep:
            print(f"kept the temp copies in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return summarize(selected, results, time.time() - t_start)


def summarize(selected, results, seconds):
    statuses = ALL_STATUSES
    print()
    print(f"{'test binary':20s} " + " ".join(f"{s:>11s}" for s in statuses))
    for test in sorted({m.test for m in selected}):
        counts = [sum(1 for m in selected if m.test == test and results[m.id][0] == s) for s in statuses]
        print(f"{test:20s} " + " ".join(f"{c:11d}" for c in counts))
    bad = [m for m in selected if results[m.id][0] not in OK_STATUSES]
    gaps = sum(1 for m in selected if results[m.id][0] == "GAP")
    caught = len(selected) - len(bad) - gaps
    print(f"{len(selected)} bugs: {caught} caught, {gaps} known gaps, {len(bad)} to look at; {seconds:.0f} s")
    for m in bad:
        print(f"  {results[m.id][0]:11s} {m.id:8s} {m.test}: {m.desc}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Mutation testing of the learning math: one small change at a time, does a unit test fail?

Each mutant changes one token of algo/, rewards/ or a kernel's torch path (a comparison, an arithmetic or
boolean operator, a number, min/max, True/False) or drops one bound or keyword argument of a call; the
file's unit tests then run against it. A mutant is *killed* when they fail (or time out) and *survives*
when they pass: a survivor is either a change no test notices or an equivalent mutant (same behaviour).

The worktree is never edited: the package is copied to a temporary directory (kernels/ as
tempo_mega/kernels, as the install maps it), each mutant is written into the copy, and a forked child
(torch already imported by the parent, so a mutant costs the tests, not the import) puts the copy first
on sys.path, runs pytest in-process and checks that the module it mutated was imported from the copy.

    scripts/mutation.sh                                   # everything below (long: see docs/testing.md)
    scripts/mutation.sh --files tempo_mega/algo/losses.py --list   # the mutants, not run
    scripts/mutation.sh --files tempo_mega/algo/ --lines 120-175
"""

from __future__ import annotations

import argparse
import ast
import bisect
import io
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import tokenize
from pathlib import Path

import pytest  # imported here once, with torch, for every forked child
import torch  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
NOT_TRITON = ["-k", "not triton"]  # the interpreted Triton cases are slow and test the Triton path
T = "tests/unit/"
# file -> (its unit tests and pytest options, the functions/classes/constants to mutate; None: all of it)
TARGETS = {
    "tempo_mega/algo/advantages.py": ([T + "test_algo_advantages.py"], None),
    "tempo_mega/algo/filters.py": ([T + "test_algo_filters.py"], None),
    "tempo_mega/algo/losses.py": ([T + "test_algo_losses.py", T + "test_algo_metrics.py"], None),
    "tempo_mega/rewards/clusters.py": ([T + "test_rewards_ttrl_empo.py"], None),
    "tempo_mega/rewards/empo.py": ([T + "test_rewards_ttrl_empo.py"], None),
    "tempo_mega/rewards/ttrl.py": ([T + "test_rewards_ttrl_empo.py"], None),
    "tempo_mega/rewards/math.py": ([T + "test_rewards_math.py"], None),
    "tempo_mega/rewards/answers.py": ([T + "test_rewards_math.py"], None),
    "tempo_mega/rewards/comparisons.py": ([T + "test_rewards_math.py"], None),
    "kernels/_common.py": ([T + "test_kernels_value_head.py", T + "test_kernels_seq_losses.py", *NOT_TRITON],
                           {"resolve_impl", "interpreting"}),
    "kernels/value_head.py": ([T + "test_kernels_value_head.py"],
                              {"_acc_dtype", "value_head_reference", "fused_value_head"}),
    "kernels/seq_losses.py": ([T + "test_kernels_seq_losses.py", *NOT_TRITON],
                              {"pack_padded", "unpack_to_padded", "_check_cu", "_check_packed", "_acc_dtype",
                               "gspo_loss_reference", "seq_clipped_value_loss_reference", "gspo_loss",
                               "seq_clipped_value_loss"}),
    "kernels/logprob.py": ([T + "test_kernels_logprob.py", *NOT_TRITON],
                           {"CHUNK_BUDGET_BYTES", "fused_linear_logprob_reference", "_Gemms", "_chunk_rows",
                            "_torch_forward", "_torch_dlogits", "_chunked_backward", "_LinearLogprob",
                            "fused_linear_logprob"}),
}
OPS = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==", "+": "-", "-": "+", "*": "/",
       "/": "*", "//": "/", "**": "*", "&": "|", "|": "&", "+=": "-=", "-=": "+=", "%": "//"}
NAMES = {"and": "or", "or": "and", "True": "False", "False": "True", "min": "max", "max": "min",
         "any": "all", "all": "any", "maximum": "minimum", "minimum": "maximum", "not": ""}


def installed_name(rel: str) -> str:
    """kernels/x.py -> tempo_mega/kernels/x.py (pyproject's package-dir)."""
    return "tempo_mega/" + rel if rel.startswith("kernels/") else rel


def numbers(text: str) -> list[str]:
    value = ast.literal_eval(text)
    if isinstance(value, complex):
        return []
    if isinstance(value, int):
        return [str(value + 1)]
    out = ["0.0"] if value != 0 else ["1.0"]  # 0.0 drops an eps or a bound
    out.append(repr(value + 1.0) if abs(value) >= 1 else f"{value * 10:g}")
    return out


def regions(tree: ast.Module, names: set[str] | None) -> list[tuple[int, int, str]]:
    """(first line, last line, name) of the top-level definitions to mutate."""
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            name = ",".join(t.id for t in targets if isinstance(t, ast.Name))
        else:
            continue
        if names is None or name in names:
            out.append((node.lineno, node.end_lineno, name))
    return out


def span(lines: list[str], node: ast.AST) -> tuple[int, int]:
    """Character offsets of an AST node in the source (ast columns count UTF-8 bytes)."""
    def offset(lineno, col):
        return sum(len(x) for x in lines[: lineno - 1]) + len(lines[lineno - 1].encode()[:col].decode())
    return offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset)


def mutants(source: str, names: set[str] | None, line_range: tuple[int, int] | None):
    """Yield (line, description, mutated source), each of which compiles."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    spans = regions(tree, names)

    def where(lineno):
        if line_range and not line_range[0] <= lineno <= line_range[1]:
            return None
        return next((name for lo, hi, name in spans if lo <= lineno <= hi), None)

    skip = set()  # annotations and docstrings are not behaviour
    for node in ast.walk(tree):
        for ann in [getattr(node, "annotation", None), getattr(node, "returns", None)]:
            if ann is not None:
                skip.update(range(*span(lines, ann)))
    line_starts = [0]
    for x in lines:
        line_starts.append(line_starts[-1] + len(x))
    edits = []  # (start, end, replacement, line): offsets into source
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        start = line_starts[tok.start[0] - 1] + tok.start[1]
        end = line_starts[tok.end[0] - 1] + tok.end[1]
        if start in skip or where(tok.start[0]) is None:
            continue
        if tok.type == tokenize.OP and tok.string in OPS:
            edits.append((start, end, OPS[tok.string], tok.start[0]))
        elif tok.type == tokenize.NAME and tok.string in NAMES:
            edits.append((start, end, NAMES[tok.string], tok.start[0]))
        elif tok.type == tokenize.NUMBER:
            edits += [(start, end, new, tok.start[0]) for new in numbers(tok.string)]
    for node in ast.walk(tree):  # a bound of a clamp dropped, the whole clamp dropped, a keyword dropped
        if not isinstance(node, ast.Call) or where(node.lineno) is None:
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("clamp", "clamp_", "clip"):
            bounds = node.args + [k.value for k in node.keywords]
            if len(bounds) == 2:
                edits += [(*span(lines, b), "None", node.lineno) for b in bounds]
            edits.append((*span(lines, node), source[slice(*span(lines, func.value))], node.lineno))
        else:
            for k in node.keywords:
                if k.arg is not None:
                    lo, hi = span(lines, k.value)
                    lo = source.rindex(k.arg, 0, lo)
                    hi = hi + len(source[hi:]) - len(source[hi:].lstrip(", \n"))  # the comma after it
                    edits.append((lo, hi, "", node.lineno))
    for start, end, new, _ in sorted(set(edits)):
        lineno = bisect.bisect_right(line_starts, start)
        mutated = source[:start] + new + source[end:]
        try:
            compile(mutated, "<mutant>", "exec")
        except SyntaxError:
            continue
        old = " ".join(source[start:end].split())
        col = start - line_starts[lineno - 1] + 1
        yield f"{lineno}:{col}", f"{where(lineno)}: {old[:50]!r} -> {new!r}", mutated


def run_tests(copy: Path, module: str, args: list[str], timeout_s: float) -> tuple[str, float]:
    """'killed' / 'survived' / 'timeout' for the tests in a forked child that imports from ``copy``."""
    sys.stdout.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 3
        try:
            os.setpgid(0, 0)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            sys.path.insert(0, str(copy))
            sys.dont_write_bytecode = True  # a same-size mutant in the same second must never hit a stale .pyc
            os.chdir(ROOT)
            torch.set_num_threads(1)  # tiny tensors gain nothing from threads on a shared machine
            code = int(pytest.main(["-q", "-x", "-p", "no:cacheprovider", *args]))
            mod = sys.modules.get(module)
            if mod is None or not str(mod.__file__).startswith(str(copy)):
                code = 99  # the mutant was not what the tests imported: the measurement is void
        finally:
            os._exit(code)
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - t0 > timeout_s:
                os.killpg(pid, signal.SIGKILL)  # the child's own process group: it and what it started
                os.waitpid(pid, 0)
                return "timeout", time.monotonic() - t0
            time.sleep(0.05)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): take the running child down too
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    code = os.waitstatus_to_exitcode(status)
    if code == 99:
        raise SystemExit(f"{module} was not imported from the mutated copy {copy}: aborting")
    return ("survived" if code == 0 else "killed"), time.monotonic() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", nargs="*", default=None, help="files or folders of TARGETS (default: all)")
    p.add_argument("--lines", default=None, help="only mutate lines A-B (with one file)")
    p.add_argument("--match", default=None, help="only mutants whose description contains this")
    p.add_argument("--tests", default=None,
                   help="pytest arguments to run instead of the file's tests, one string "
                        "(e.g. 'tests/unit/test_algo_metrics.py -k dual_clip')")
    p.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    p.add_argument("--out", default=None, help="also write the report to this file")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks below run
    files = [f for f in TARGETS if a.files is None or any(f.startswith(x.rstrip("*")) for x in a.files)]
    if not files:
        raise SystemExit(f"no file of {list(TARGETS)} matches {a.files}")
    line_range = tuple(int(x) for x in a.lines.split("-")) if a.lines else None
    report = []

    def say(line):
        print(line, flush=True)
        report.append(line)

    tmp = Path(tempfile.mkdtemp(prefix="tempo_mutation_"))
    try:
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(ROOT / "tempo_mega", tmp / "tempo_mega", ignore=ignore)
        shutil.copytree(ROOT / "kernels", tmp / "tempo_mega" / "kernels", ignore=ignore)
        shutil.copytree(ROOT / "configs", tmp / "tempo_mega" / "configs", ignore=ignore)
        totals = {"killed": 0, "survived": 0, "timeout": 0}
        t_start = time.monotonic()
        for rel in files:
            tests, names = TARGETS[rel]
            target = tmp / installed_name(rel)
            module = installed_name(rel)[:-3].replace("/", ".")
            original = (ROOT / rel).read_text()
            found = [m for m in mutants(original, names, line_range) if a.match is None or a.match in m[1]]
            tests = shlex.split(a.tests) if a.tests else tests
            if a.list:
                for lineno, desc, _ in found:
                    say(f"{rel}:{lineno}  {desc}")
                say(f"{rel}: {len(found)} mutants")
                continue
            status, base_s = run_tests(tmp, module, tests, timeout_s=600)
            if status != "survived":
                raise SystemExit(f"{rel}: the unmutated tests do not pass ({status}): fix that first")
            timeout_s = 3 * base_s + 30
            say(f"== {rel}: {len(found)} mutants, tests {' '.join(tests)} ({base_s:.1f} s unmutated)")
            counts = {"killed": 0, "survived": 0, "timeout": 0}
            try:
                for lineno, desc, mutated in found:
                    target.write_text(mutated)
                    status, took = run_tests(tmp, module, tests, timeout_s)
                    counts[status] += 1
                    if status != "killed":
                        say(f"  {status.upper():8s} {rel}:{lineno}  {desc}  ({took:.1f} s)")
            finally:
                target.write_text(original)  # the copy only; the worktree is never written
            n = len(found)
            say(f"   {rel}: killed {counts['killed'] + counts['timeout']}/{n} "
                f"({counts['timeout']} by timeout), survived {counts['survived']}")
            for k in totals:
                totals[k] += counts[k]
        if not a.list:
            n = sum(totals.values())
            say(f"== total: {n} mutants, killed {totals['killed'] + totals['timeout']}, "
                f"survived {totals['survived']}, {time.monotonic() - t_start:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if a.out:
            Path(a.out).write_text("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

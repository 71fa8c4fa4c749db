#!/usr/bin/env python3
"""Run one CI pass's pytest command and fail it on any skip that .ci/expected-skips.txt does not list.

    python3 .ci/check_skips.py PASS -- COMMAND [ARGS...]

COMMAND (pytest, or `make test`) must print pytest's skip summary: add `-rfEs` (or PYTEST_ARGS=-rfEs for make).
Its output is passed through as it comes. Afterwards every `SKIPPED [N] FILE:LINE: REASON` line is matched against
the entries of PASS in .ci/expected-skips.txt (file and reason, shell-style wildcards); an unmatched skip fails the
pass and is named. The status is COMMAND's when it failed (exit 5, no test collected, is a failure and said so),
else 1 when a skip was unexpected or the skip summary does not account for every skip, else 0.
Standard library only: it runs with any Python 3 (the torch-2.1 venv's, the system's).
"""
import fnmatch
import os
import re
import subprocess
import sys

EXPECTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'expected-skips.txt')
SKIP_LINE = re.compile(r'^SKIPPED \[(\d+)\] (.+?):(\d+): (.*)$')
SKIPPED_COUNT = re.compile(r'\b(\d+) skipped\b')


def read_expected(path, pass_name):
    """[(file glob, reason glob)] of the entries for `pass_name`: lines `PASSES | FILE | REASON`, PASSES being
    comma-separated names or *; # comments."""
    entries = []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            fields = [x.strip() for x in line.split('|')]
            if len(fields) != 3 or not all(fields):
                sys.exit(f'error: {path}:{number}: expected "PASSES | FILE | REASON", got {line!r}')
            passes, file_glob, reason_glob = fields
            if passes == '*' or pass_name in [p.strip() for p in passes.split(',')]:
                entries.append((file_glob, reason_glob))
    return entries


def run_streaming(cmd):
    """(exit status, output lines): the command's stdout and stderr, passed through as they come."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors='replace')
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line.rstrip('\n'))
    return proc.wait(), lines


def check(lines, entries, pass_name):
    """The problems found in pytest's output (an empty list when every skip is expected)."""
    skips = [m.groups() for m in map(SKIP_LINE.match, lines) if m]
    problems = []
    for count, path, lineno, reason in skips:
        if not any(fnmatch.fnmatchcase(path, f) and fnmatch.fnmatchcase(reason, r) for f, r in entries):
            problems.append(f'unexpected skip ({count} test(s)) at {path}:{lineno}: {reason} (not in '
                            f'.ci/expected-skips.txt: fix what it skips on, or list it there with why)')
    reported = sum(int(c) for c, *_ in skips)
    totals = [int(m.group(1)) for m in map(SKIPPED_COUNT.search, lines) if m and ' in ' in m.string]
    if totals and totals[-1] != reported:
        problems.append(f'pytest counted {totals[-1]} skipped test(s) but its skip summary names {reported}: '
                        f'run pytest with -rs (pass {pass_name})')
    return problems


def main(argv):
    if len(argv) < 3 or argv[1] != '--':
        sys.exit('usage: check_skips.py PASS -- COMMAND [ARGS...]')
    pass_name, cmd = argv[0], argv[2:]
    entries = read_expected(EXPECTED, pass_name)
    rc, lines = run_streaming(cmd)
    problems = check(lines, entries, pass_name)
    label = f'CI pass {pass_name}'
    if rc == 5:
        print(f'{label}: pytest collected no test (exit 5): {" ".join(cmd)}', file=sys.stderr)
    for p in problems:
        print(f'{label}: {p}', file=sys.stderr)
    if rc == 0 and not problems:
        print(f'{label}: every skip is expected (.ci/expected-skips.txt)')
    return rc or (1 if problems else 0)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))

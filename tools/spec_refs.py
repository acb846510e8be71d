#!/usr/bin/env python3
"""Point every "SPEC n" mention at the project's own algorithm document, docs/algorithms.md.

    python tools/spec_refs.py           # rewrite tracked *.py / *.md / *.yaml files in place
    python tools/spec_refs.py --check   # list what is left, exit 1 if anything is

Mentions of the old out-of-tree spec ("SPEC 5", "SPEC section 3", "SPEC 2.4-2.6", "the SPEC
formulas", "../shared/SPEC.md") become "docs/algorithms.md §5" and so on: the document's sections
carry the same numbers, so the rewrite is mechanical and can be rerun after any merge.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

DOC = "docs/algorithms.md"
RULES = [
    (re.compile(r"(?:\.\./)+shared/SPEC\.md"), DOC),
    (re.compile(r"\bSPEC section (\d)"), DOC + r" §\1"),
    (re.compile(r"\bSPEC (\d(?:[.\d]*\d)?(?:-\d(?:[.\d]*\d)?)?)"), DOC + r" §\1"),
    (re.compile(r"\bSPEC\b(?!S)"), DOC),
]
LEFT = re.compile(r"\bSPEC\b|\.\./shared")
SKIP = {DOC, "tools/spec_refs.py"}


def tracked_files(root: pathlib.Path):
    out = subprocess.run(["git", "ls-files", "-z", "--", "*.py", "*.md", "*.yaml"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return [root / p for p in out.split("\0") if p and p not in SKIP]


def rewrite(text: str) -> str:
    for pattern, repl in RULES:
        text = pattern.sub(repl, text)
    return text


def main(argv) -> int:
    root = pathlib.Path(__file__).resolve().parents[1]
    check = "--check" in argv
    left, changed = [], 0
    for path in tracked_files(root):
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        if check:
            left += [f"{path.relative_to(root)}:{n}: {line.strip()}"
                     for n, line in enumerate(text.splitlines(), 1) if LEFT.search(line)]
            continue
        new = rewrite(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed += 1
    if check:
        print("\n".join(left) or "no SPEC mentions left")
        return 1 if left else 0
    print(f"rewrote {changed} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

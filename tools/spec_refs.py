#!/usr/bin/env python3
"""Point every "SPEC n" mention at the project's own algorithm document, docs/algorithms.md.

    python tools/spec_refs.py           # rewrite tracked *.py / *.md / *.yaml files in place
    python tools/spec_refs.py --check   # list what is left, exit 1 if anything is

Mentions of the old out-of-tree spec ("SPEC 5", "SPEC section 3", "SPEC 2.4-2.6", "the SPEC
formulas", a relative path to SPEC.md) become "docs/algorithms.md §5" and so on: the document's
sections carry the same numbers, so the rewrite is mechanical and can be rerun after any merge.
When the longer pointer pushes a line past 100 characters, the overflow flows into the next line
of the same paragraph (comment, docstring or Markdown), or onto a line of its own; a
"# -- title ---" ruler loses dashes instead.
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
WIDTH = 100
DOCSTRING_END = ('"' * 3, "'" * 3)
NOT_PROSE = ("- ", "* ", "#", "```", ">>>", "|") + DOCSTRING_END


def tracked_files(root: pathlib.Path):
    out = subprocess.run(["git", "ls-files", "-z", "--", "*.py", "*.md", "*.yaml"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return [root / p for p in out.split("\0") if p and p not in SKIP]


def rewrite_line(line: str) -> str:
    for pattern, repl in RULES:
        line = pattern.sub(repl, line)
    return line


def _split(line: str):
    """-> (first line, prefix of its continuation or None, overflow), or None if it cannot wrap."""
    ruler = re.match(r"(.*\S) -{4,}$", line)
    if ruler and len(ruler.group(1)) + 5 <= WIDTH:  # "# -- title ---...": fewer dashes instead
        return ruler.group(1) + " " + "-" * (WIDTH - len(ruler.group(1)) - 1), None, ""
    indent = re.match(r"\s*", line).group(0)
    body = line[len(indent):]
    trailing = line.find("  # ")
    if body.startswith("#"):  # a comment: it continues as a comment
        lead = indent + re.match(r"#\s*", body).group(0)
        cont = lead
    elif trailing > 0:  # code or YAML with a trailing comment: the rest gets a comment line
        lead, cont = line[:trailing + 4], indent + "# "
    elif body.startswith(("- ", "* ")):  # a Markdown list item
        lead, cont = indent + "  ", indent + "  "
    else:  # prose: docstrings, Markdown
        lead, cont = indent, indent
    cut = line.rfind(" ", len(lead), WIDTH + 1)
    if cut <= len(lead) or not line[:cut].strip():
        return None
    return line[:cut].rstrip(), cont, line[cut + 1:]


def _continues(nxt: str, cont: str, overflow: str) -> bool:
    """Is ``nxt`` more of the same paragraph, so that the overflow can flow into it?"""
    if not nxt.strip() or not nxt.startswith(cont) or overflow.rstrip().endswith(DOCSTRING_END):
        return False
    rest = nxt[len(cont):]
    if not rest or rest[0].isspace():
        return False
    return bool(cont.strip()) or not rest.startswith(NOT_PROSE)  # any comment text continues


def rewrite(text: str) -> str:
    lines = text.split("\n")
    out, i, reflowed = [], 0, set()
    while i < len(lines):
        line = lines[i]
        new = rewrite_line(line)
        touched = new != line or i in reflowed
        was_long = len(line) > WIDTH and i not in reflowed
        split = _split(new) if touched and len(new) > WIDTH and not was_long else None
        if split is None:
            out.append(new)
            i += 1
            continue
        head, cont, overflow = split
        out.append(head)
        if cont is None:  # a shortened ruler
            i += 1
        elif i + 1 < len(lines) and _continues(lines[i + 1], cont, overflow):
            lines[i + 1] = cont + overflow + " " + lines[i + 1][len(cont):]
            reflowed.add(i + 1)
            i += 1
        else:  # a line of its own, wrapped again if still too long
            lines[i] = cont + overflow
            reflowed.add(i)
    return "\n".join(out)


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

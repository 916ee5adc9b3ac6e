"""Paste a generated results summary into the README between its markers.

The README's results section is `results/summary.md` (dmr.summary, the last job of `make run`) as
one run generated it, under a line that names the commit and how it was built. This replaces what
lies between the two markers and nothing else, so the numbers are never typed by hand:

    python -m dmr.paste results/summary.md README.md \\
        --note "Built by \\`make run\\` from a fresh clone of commit abc1234: 71 minutes on 2 cores."
"""
from __future__ import annotations

import argparse
from pathlib import Path

BEGIN = "<!-- RESULTS SUMMARY: generated, do not edit by hand -->\n"
END = "<!-- END RESULTS SUMMARY -->"


def nest(summary: str, level: int) -> str:
    """The summary's headings under a README section of heading `level`: its title (a first `# `
    line) goes, the note above names the run instead, and its highest remaining heading becomes
    level + 1, the others keeping their depth below it."""
    lines = summary.strip("\n").splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    depth = [len(ln) - len(ln.lstrip("#")) for ln in lines if ln.startswith("#")]
    shift = level + 1 - min(depth) if depth else 0
    return "\n".join("#" * shift + ln if ln.startswith("#") else ln for ln in lines).strip("\n")


def paste(readme: str, summary: str, note: str) -> str:
    """`readme` with the text between BEGIN and END replaced by `note` and `summary`, the summary's
    headings nested under the README heading above BEGIN (`nest`)."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise ValueError(f"the README must hold each marker once: {BEGIN.strip()!r} and {END!r}")
    i, j = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    if j < i:
        raise ValueError(f"{END!r} comes before {BEGIN.strip()!r}")
    if not note.strip():
        raise ValueError("give --note: the commit and the run the summary comes from")
    above = [ln for ln in readme[:i].splitlines() if ln.startswith("#")]
    level = len(above[-1]) - len(above[-1].lstrip("#")) if above else 1
    return readme[:i] + note.strip() + "\n\n" + nest(summary, level) + "\n" + readme[j:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summary", type=Path, help="the generated summary (results/summary.md)")
    p.add_argument("readme", type=Path)
    p.add_argument("--note", required=True, help="the line above the summary: commit, how it was built, wall time")
    # Half the README's 70.8 KB before the docs split (issue 20: usage stays, measurement history goes).
    p.add_argument("--max-bytes", type=int, default=35_000, help="fail rather than write a README larger than this")
    a = p.parse_args(argv)
    try:
        text = paste(a.readme.read_text(), a.summary.read_text(), a.note)
    except (OSError, ValueError) as e:
        raise SystemExit(f"dmr.paste: {e}") from None
    size = len(text.encode())
    if size > a.max_bytes:
        raise SystemExit(f"dmr.paste: the README would be {size} bytes, over --max-bytes {a.max_bytes}; "
                         "shorten the summary or the README, nothing was written")
    a.readme.write_text(text)
    print(f"{a.readme}: results section replaced ({size} bytes)")


if __name__ == "__main__":
    main()

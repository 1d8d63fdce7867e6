"""Render the README's benchmark tables from the committed results in ``bench/results/``.

Every table (and every figure in the lines around it) that a bench measured sits in README.md between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; this script renders each one from its JSON files::

    python bench/report.py            # print every section
    python bench/report.py --write    # rewrite those README blocks from the results
    python bench/report.py --check    # exit 1 when a README block differs from what the results render,
                                      # or a section, block or results file is missing

A section's first line says when, at which commit, on which CPU and how loaded the machine was (the benches
record it: ``bench/common.py``'s ``environment``). Rerunning a bench rewrites its JSON; ``--write`` then updates
the README, and ``--check`` (run by the tests) keeps the two from drifting apart.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
BLOCK = re.compile(r"<!-- bench:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /bench:(?P=name) -->", re.S)


@dataclass(frozen=True)
class Section:
    """One README block: the results files it reads, the bench that writes them, and its renderer."""

    name: str
    files: tuple[str, ...]
    command: str
    render: Callable[..., str]


SECTIONS: dict[str, Section] = {}


def section(name: str, *files: str, command: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Register ``render(*results)`` as the renderer of README block ``name`` (one argument per file)."""

    def register(render: Callable[..., str]) -> Callable[..., str]:
        SECTIONS[name] = Section(name, files, command, render)
        return render

    return register


class MissingResults(Exception):
    """A results file a section needs is not in bench/results/."""


# ----------------------------------------------------------------------------------------------- formatting
def provenance(*results: dict) -> str:
    """One line per distinct environment: date, commit, CPU, threads, versions and load average."""
    lines = []
    for d in results:
        env = d.get("environment", {})
        commit = str(env.get("commit", "not recorded"))
        commit = commit[:7] + ("-dirty" if commit.endswith("-dirty") else "") if commit != "not recorded" else commit
        load = env.get("loadavg")
        line = (f"Measured {env.get('date', '(date not recorded)')}, commit {commit}, {env.get('cpu', '?')} "
                f"({env.get('cores', '?')} cores), {env.get('threads', '?')} thread(s), onnxruntime "
                f"{env.get('onnxruntime', '?')}" + (f", torch {env['torch']}" if "torch" in env else "")
                + (f", load average {load:.1f} at the start" if isinstance(load, (int, float)) else ""))
        if line not in lines:
            lines.append(line)
    return "\n".join(f"_{line}._" for line in lines)


def _num(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def _target(name: str, value: float, target: float, unit: str = "×", higher: bool = True) -> str:
    met = value >= target if higher else value <= target
    sign = "≥" if higher else "≤"
    return f"{name}: {value:.2f}{unit} (target {sign} {target}{unit}) — " + ("met" if met else "**missed**")


# --------------------------------------------------------------------------------------------------- sections
@section("int8-flavours", "int8_flavours_minilm.json", "int8_flavours_qwen3-0.6b-shape.json",
         command="python bench/int8_flavours.py --model minilm ...; --model qwen3-0.6b-shape ... (see its docstring)")
def int8_flavours(minilm: dict, qwen: dict) -> str:
    m, q = minilm["results"], qwen["results"]

    def kept(r: dict) -> str:
        return f" ({r['kept_fp32_nodes']} products kept fp32)" if r.get("kept_fp32_nodes") else ""

    def delta(r: dict) -> str:
        """As the runtime scores by default now: right padding, one scoring path (``aligned`` in runs made while
        decoders still padded left by default; the left-padding figure follows it)."""
        d = r["alone_vs_200_max_abs_logit_diff"]
        now, left = d.get("aligned", d.get("default")), d.get("default") if "aligned" in d else None
        fmt = lambda x: "0" if x == 0 else f"{x:.3f}" if x >= 1e-3 else f"{x:.1e}"  # noqa: E731
        return "—" if now is None else fmt(now) + (f" (left-padded: {fmt(left)})" if left is not None else "")

    rows = [("per-tensor (onnxruntime dynamic)", "per-tensor"), ("per-row (`int8`)", "per-row")]
    lines = [provenance(minilm, qwen), "",
             f"Workloads: MiniLM {minilm['workload']}; 0.6B shape {qwen['workload']}.", "",
             "| int8 flavour | MiniLM pairs/s, every product int8 | MiniLM, after the fidelity search "
             "| 0.6B shape pairs/s | alone vs among 200, max \\|Δlogit\\| (MiniLM / 0.6B) |",
             "|---|---|---|---|---|"]
    for label, key in rows:
        plain, searched, big = m.get(f"{key} plain"), m.get(f"{key} searched"), q.get(f"{key} plain")
        share = ""
        if key != "per-tensor" and big and q.get("per-tensor plain"):
            share = f" ({100 * big['pairs_per_s'] / q['per-tensor plain']['pairs_per_s']:.0f} %)"
        lines.append(f"| {label} | {_num(plain['pairs_per_s'])} | "
                     + (f"{_num(searched['pairs_per_s'])}{kept(searched)}" if searched else "—") + " | "
                     + (f"{big['pairs_per_s']:.2f}{share}" if big else "—") + " | "
                     + f"{delta(plain)} / {delta(big) if big else '—'} |")
    lines.append(f"| fp32 | {_num(m['fp32']['pairs_per_s'])} | — | {q['fp32']['pairs_per_s']:.2f} | "
                 f"{delta(m['fp32'])} / {delta(q['fp32'])} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main
def load(name: str) -> dict:
    path = RESULTS / name
    if not path.is_file():
        raise MissingResults(f"bench/results/{name} is missing")
    return json.loads(path.read_text())


def render(sec: Section) -> str:
    return sec.render(*(load(f) for f in sec.files)).rstrip("\n") + "\n"


def readme_blocks(text: str) -> dict[str, str]:
    return {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}


def write_readme(text: str, rendered: dict[str, str]) -> str:
    return BLOCK.sub(lambda m: (f"<!-- bench:{m.group('name')} -->\n{rendered.get(m.group('name'), m.group('body'))}"
                                f"<!-- /bench:{m.group('name')} -->"), text)


def check(text: str) -> list[str]:
    """Every difference between the README's blocks and what the committed results render."""
    problems = []
    blocks = readme_blocks(text)
    for name in blocks.keys() - SECTIONS.keys():
        problems.append(f"README block {name!r} has no renderer in bench/report.py")
    for name, sec in SECTIONS.items():
        if name not in blocks:
            problems.append(f"README has no <!-- bench:{name} --> block for section {name!r}")
            continue
        try:
            want = render(sec)
        except MissingResults as exc:
            problems.append(f"{name}: {exc}; run `{sec.command}`")
            continue
        if blocks[name] != want:
            diff = "".join(difflib.unified_diff(blocks[name].splitlines(True), want.splitlines(True),
                                                "README.md", "rendered", n=0))
            problems.append(f"{name}: the README differs from what bench/results render "
                            f"(python bench/report.py --write):\n{diff}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md differs from the results")
    mode.add_argument("--write", action="store_true", help="rewrite README.md's bench blocks from the results")
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    if args.check:
        problems = check(text)
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{len(SECTIONS) - len(problems)} of {len(SECTIONS)} sections match the committed results"
              if problems else f"README matches bench/results ({len(SECTIONS)} sections)")
        return 1 if problems else 0
    rendered = {}
    for name, sec in SECTIONS.items():
        try:
            rendered[name] = render(sec)
        except MissingResults as exc:
            print(f"{name}: {exc}; run `{sec.command}`", file=sys.stderr)
    if args.write:
        new = write_readme(text, rendered)
        args.readme.write_text(new, encoding="utf-8")
        print(f"README: {sum(1 for n in rendered if n in readme_blocks(text))} block(s) rewritten")
        return 0
    for name, body in rendered.items():
        print(f"<!-- bench:{name} -->\n{body}<!-- /bench:{name} -->\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Mutation score of the last `make mutation` run, per area, as one JSON document on stdout.

Reads mutmut's verdicts (`mutmut results --all true`) and the list of mutants we judged
equivalent (benchmarks/mutation_equivalents.yaml: mutant name -> why no test can tell it apart).
The score is killed / (mutants - equivalent): a timeout counts as killed (the tests noticed the
mutant, by not finishing), a mutant no fast test reaches counts as surviving.

    .venv/bin/python benchmarks/mutation_score.py            # after `make mutation`
    .venv/bin/python benchmarks/mutation_score.py --survivors  # also list the survivors
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EQUIVALENTS = REPO / "benchmarks" / "mutation_equivalents.yaml"
GOALS = {"vae": 0.90, "pipelines": 0.80}
DETECTED = {"killed", "timeout", "caught by type check"}


def verdicts() -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pairs = (line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)
    return {name: status for name, status in pairs}


def score(results: dict[str, str], equivalent: dict[str, str]) -> dict:
    areas: dict = {}
    for area, goal in GOALS.items():
        mine = {n: s for n, s in results.items() if n.startswith(area + ".")}
        counts = Counter(mine.values())
        eq = [n for n in mine if n in equivalent and mine[n] not in DETECTED | {"not checked"}]
        killed = sum(counts[s] for s in DETECTED)
        unchecked = counts["not checked"]  # an interrupted run: the score is of the rest
        judged = len(mine) - len(eq) - unchecked
        areas[area] = {
            "mutants": len(mine),
            "killed": killed,
            "equivalent": len(eq),
            "not_checked": unchecked,
            "survived": sorted(
                n for n, s in mine.items() if s not in DETECTED | {"not checked"} and n not in eq
            ),
            "verdicts": dict(counts),
            "score": round(killed / judged, 4) if judged else None,
            "goal": goal,
        }
        areas[area]["goal_met"] = bool(judged) and not unchecked and killed / judged >= goal
    return areas


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--survivors", action="store_true", help="list every surviving mutant")
    args = ap.parse_args()
    equivalent = yaml.safe_load(EQUIVALENTS.read_text()) or {}
    areas = score(verdicts(), equivalent)
    if not any(a["mutants"] for a in areas.values()):
        print(json.dumps({"error": "no mutmut results here; run 'make mutation' first"}))
        return 2
    for a in areas.values():
        a["survived_count"] = len(a["survived"])
        if not args.survivors:
            del a["survived"]
    print(json.dumps(areas, indent=2))
    return 0 if all(a["goal_met"] for a in areas.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

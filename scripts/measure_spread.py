"""Measure how much the notebooks' recorded numbers move between machines, and record it.

    python scripts/measure_spread.py [notebooks/NAME.ipynb ...]          # run every combination, then record
    python scripts/measure_spread.py --from DIR [notebooks/NAME.ipynb ...]  # only record, from an earlier run

Each notebook is executed (on a copy, in record mode) once per combination of ATen CPU capability
(``default``: no SIMD kernels, ``avx2``: as on a CPU without AVX-512, ``native``: this machine's) and thread
count (1, 2); the numbers it pins with ``Expectations.check`` land in ``DIR/<capability>-<threads>/``. The
largest difference of each number across the combinations is written to ``results/notebooks/cpu_spread.json``
with the provenance of the measurement; checks made with ``spread=True`` take their tolerance from it
(``freeatten_core.expected``). Takes about six times as long as executing the notebooks once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from freeatten_core import atomic  # noqa: E402
from freeatten_core.expected import DIR_ENV, SPREAD_FILE, repo_root  # noqa: E402
from freeatten_core.provenance import provenance  # noqa: E402

CAPABILITIES = ("default", "avx2", "native")
THREADS = (1, 2)


def run_combinations(notebooks: list[Path], out: Path) -> None:
    for cap in CAPABILITIES:
        for t in THREADS:
            combo = out / f"{cap}-{t}"
            combo.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix="spread_nb_"))
            copies = []
            for nb in notebooks:
                shutil.copy(nb, work / nb.name)
                copies.append(str(work / nb.name))
            env = dict(os.environ, OMP_NUM_THREADS=str(t), **{DIR_ENV: str(combo)})
            env.pop("ATEN_CPU_CAPABILITY", None)
            if cap != "native":
                env["ATEN_CPU_CAPABILITY"] = cap
            print(f"=== {cap}, {t} thread(s)", flush=True)
            subprocess.run([sys.executable, str(ROOT / "scripts" / "execute_notebooks.py"), *copies], env=env,
                           check=True, cwd=ROOT)
            shutil.rmtree(work, ignore_errors=True)


def record(notebooks: list[Path], out: Path) -> dict:
    path = repo_root() / SPREAD_FILE
    data = json.loads(path.read_text()) if path.exists() else {"notebooks": {}}
    combos = sorted(p.name for p in out.iterdir() if p.is_dir())
    for nb in notebooks:
        runs = {c: json.loads((out / c / f"{nb.stem}.json").read_text()) for c in combos
                if (out / c / f"{nb.stem}.json").exists()}
        if len(runs) < 2:
            raise SystemExit(f"{nb.stem}: fewer than two combinations recorded under {out}")
        labels = set.intersection(*(set(r["values"]) for r in runs.values()))
        spread = {}
        for label in sorted(labels):
            vals = [r["values"][label]["value"] for r in runs.values()]
            spread[label] = max(vals) - min(vals)
        first = next(iter(runs.values()))
        data["notebooks"][nb.stem] = {
            "combinations": sorted(runs), "params": first["params"], "spread": spread,
            "measured_at": first["provenance"],
            "provenance": provenance(command="scripts/measure_spread.py " + nb.name),
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, data)
    return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", type=Path)
    ap.add_argument("--from", dest="source", type=Path, help="record from an earlier run's directory")
    args = ap.parse_args(argv)
    notebooks = [p.resolve() for p in args.notebooks] or sorted((ROOT / "notebooks").glob("0*.ipynb"))
    out = args.source or Path(tempfile.mkdtemp(prefix="freeatten_spread_"))
    if args.source is None:
        run_combinations(notebooks, out)
    data = record(notebooks, out)
    for nb in notebooks:
        s = data["notebooks"][nb.stem]["spread"]
        worst = sorted(s.items(), key=lambda kv: -kv[1])[:3]
        print(f"{nb.stem}: {len(s)} numbers; largest spreads: " + ", ".join(f"{k} {v:.3g}" for k, v in worst))


if __name__ == "__main__":
    main()

"""Re-execute every chapter at one preset, through papermill, into ``results/<preset>/`` with provenance.

Command line, from the repository root (``make reproduce PRESET=cpu`` is the same)::

    python -m freeatten_core reproduce --preset cpu                      # every chapter, then the seed runs
    python -m freeatten_core reproduce --preset gpu --notebooks 02_entropy_scaling,04_training_extrapolation
    python -m freeatten_core reproduce --preset cpu --notebooks none     # only the multi-seed runs
    python -m freeatten_core reproduce --preset cpu --dry-run            # print what would run

What it writes, under ``--out`` (default ``results/<preset>``):

* ``<chapter>.ipynb``: each chapter executed with papermill at the preset (a chapter registered in
  :data:`freeatten_core.presets.NOTEBOOK_PARAMETERS` receives ``preset``, and ``run_dir``/``results_dir`` where
  it has them; any other chapter runs at its own defaults, and the manifest says so), with the run's provenance
  in its metadata (``metadata.freeatten.provenance``);
* ``<chapter>/``: what a chapter writes itself given a ``results_dir`` (JSON per variant, figures);
* ``seeds/seed<N>/``: for presets with seed runs (:data:`freeatten_core.presets.SEED_RUNS`), the
  extrapolation experiment once per training seed (``python -m freeatten_core experiments extrapolation ...
  --set seed=N``), one JSON per variant with provenance and ``claims.json``;
* ``manifest.json``: the preset, the command, the provenance (device, commit, date) and one entry per chapter
  and seed run (parameters, output, seconds, status), rewritten after each step.

Every value and path is checked before the first chapter starts; a chapter that fails stops the run with
exit status 1 after the manifest has recorded the error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import atomic
from .presets import NOTEBOOK_PARAMETERS, PRESETS, SEED_RUNS

ROOT = Path(__file__).resolve().parent.parent


def chapter_notebooks(notebook_dir) -> list[Path]:
    """The chapters of ``notebook_dir``: ``NN_name.ipynb`` files, in order."""
    folder = Path(notebook_dir)
    if not folder.is_dir():
        raise ValueError(f"notebook directory {folder} does not exist")
    return sorted(p for p in folder.glob("[0-9]*.ipynb") if p.is_file())


def select_notebooks(notebook_dir, names: str | None) -> list[Path]:
    """``names``: comma-separated chapter names (``04_training_extrapolation`` or ``04``), ``none``, or None
    (every chapter). Raises naming an unknown chapter and the valid ones."""
    chapters = chapter_notebooks(notebook_dir)
    if names is None:
        return chapters
    if names.strip() == "none":
        return []
    picked = []
    for name in [n.strip().removesuffix(".ipynb") for n in names.split(",") if n.strip()]:
        hits = [p for p in chapters if p.stem == name or p.stem.split("_", 1)[0] == name]
        if len(hits) != 1:
            raise ValueError(f"unknown chapter {name!r}; chapters in {notebook_dir}: "
                             f"{', '.join(p.stem for p in chapters) or 'none'}")
        if hits[0] not in picked:
            picked.append(hits[0])
    if not picked:
        raise ValueError(f"--notebooks names no chapter, got {names!r} (use 'none' for no chapter)")
    return picked


def notebook_parameters(notebook: Path, preset: str, out: Path, run_dir: Path) -> dict | None:
    """What papermill injects into chapter ``notebook`` at ``preset``; None for a chapter without registered
    parameters (it runs at its own defaults). Paths are relative to the chapter's folder (its working
    directory when it runs)."""
    spec = NOTEBOOK_PARAMETERS.get(notebook.stem)
    if spec is None:
        return None
    here = notebook.parent.resolve()
    params = {"preset": preset}
    if "results_dir" in spec["checks"]:
        params["results_dir"] = os.path.relpath((out / notebook.stem).resolve(), here)
    if "run_dir" in spec["checks"]:
        params["run_dir"] = os.path.relpath((run_dir / f"reproduce_{preset}" / notebook.stem).resolve(), here)
    return params


def seed_commands(preset: str, seeds, out: Path, run_dir: Path) -> list[list[str]]:
    """The ``experiments`` argument lists of the seed runs of ``preset`` (one per seed)."""
    if not seeds:
        return []
    variants = ",".join(SEED_RUNS[preset]["variants"])
    return [["extrapolation", "--preset", preset, "--variants", variants, "--set", f"seed={s}",
             "--run-dir", str(run_dir / f"{preset}_seeds" / f"seed{s}"), "--out", str(out / "seeds" / f"seed{s}")]
            for s in seeds]


def _parse_seeds(text: str | None, preset: str) -> list[int]:
    if text is None:
        return list(SEED_RUNS.get(preset, {}).get("seeds", ()))
    if text.strip() == "none":
        return []
    seeds = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        try:
            s = int(item)
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers >= 0 or 'none', got {text!r}") from None
        if s < 0 or s in seeds:
            raise ValueError(f"--seeds must be distinct integers >= 0, got {text!r}")
        seeds.append(s)
    if not seeds:
        raise ValueError(f"--seeds names no seed, got {text!r} (use 'none' for no seed run)")
    if preset not in SEED_RUNS:
        raise ValueError(f"preset {preset!r} has no seed runs (freeatten_core/presets.py SEED_RUNS: "
                         f"{', '.join(SEED_RUNS) or 'none'}); use --seeds none")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m freeatten_core reproduce",
                                 description="re-execute every chapter at a preset (papermill) -> results/<preset>/")
    ap.add_argument("--preset", required=True, help=f"run size: {', '.join(PRESETS)} (presets/<name>.yaml)")
    ap.add_argument("--notebooks", default=None,
                    help="comma-separated chapters (04_training_extrapolation or 04), or 'none' (default: all)")
    ap.add_argument("--seeds", default=None, help="training seeds of the multi-seed runs, comma-separated, or "
                                                  "'none' (default: the preset's, see SEED_RUNS)")
    ap.add_argument("--out", default=None, help="output folder (default results/<preset>)")
    ap.add_argument("--run-dir", default="runs", help="checkpoints and logs (default runs/)")
    ap.add_argument("--notebook-dir", default="notebooks", help="where the chapters are (default notebooks/)")
    ap.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per cell (default 14400)")
    ap.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = "python -m freeatten_core reproduce " + " ".join(argv)
    try:  # every value and path checked before the first chapter starts
        if args.preset not in PRESETS:
            raise ValueError(f"unknown preset {args.preset!r}; valid presets: {', '.join(PRESETS)}")
        notebooks = select_notebooks(args.notebook_dir, args.notebooks)
        seeds = _parse_seeds(args.seeds, args.preset)
        if args.timeout < 1:
            raise ValueError(f"--timeout must be >= 1, got {args.timeout}")
        out = atomic.check_output_dir(args.out or Path("results") / args.preset, "--out")
        run_dir = atomic.check_output_dir(args.run_dir, "--run-dir")
        if not notebooks and not seeds:
            raise ValueError("nothing to run: no chapter (--notebooks none) and no seed run")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = [(nb, notebook_parameters(nb, args.preset, out, run_dir)) for nb in notebooks]
    commands = seed_commands(args.preset, seeds, out, run_dir)
    for nb, params in plan:
        how = f"papermill with {params}" if params is not None else "papermill at its own defaults (no preset " \
                                                                    "parameters registered)"
        print(f"{nb.stem}: {how} -> {out / (nb.stem + '.ipynb')}")
    for c in commands:
        print("python -m freeatten_core experiments " + " ".join(c))
    if args.dry_run:
        return 0
    return _run(args.preset, plan, commands, out, args.timeout, command)


def _run(preset, plan, commands, out: Path, timeout: int, command: str) -> int:
    import nbformat
    import papermill

    from .experiments import main as experiments_main
    from .provenance import provenance
    from .runtime import resolve_device

    prov = provenance(command, resolve_device("auto"))
    manifest = {"preset": preset, "provenance": prov, "notebooks": [], "seed_runs": []}
    atomic.remove_stale_temporaries(out)

    def save():
        atomic.write_json(out / "manifest.json", manifest)

    env_before = os.environ.get("FREEATTEN_RECORD_EXPECTED")
    os.environ["FREEATTEN_RECORD_EXPECTED"] = "0"  # the kernels check against the recorded run, never record
    try:
        for nb, params in plan:
            entry = {"notebook": nb.stem, "output": str(_rel(out / f"{nb.stem}.ipynb")), "parameters": params,
                     "preset_applied": params is not None, "status": "running"}
            manifest["notebooks"].append(entry)
            save()
            t0 = time.time()
            try:
                executed = papermill.execute_notebook(str(nb), None, parameters=params or {}, kernel_name="python3",
                                                      cwd=str(nb.parent), progress_bar=False,
                                                      execution_timeout=timeout)
            except Exception as e:  # papermill's execution error carries the cell's traceback
                entry.update(status="failed", seconds=round(time.time() - t0, 1),
                             error=f"{type(e).__name__}: {str(e).strip()[-2000:]}")
                save()
                print(f"error: {nb.stem} failed; see {out / 'manifest.json'}\n{entry['error']}", file=sys.stderr)
                return 1
            executed.metadata["freeatten"] = {"provenance": {**prov, "date_utc": provenance()["date_utc"]},
                                              "preset": preset, "parameters": params}
            atomic.write_text(out / f"{nb.stem}.ipynb", nbformat.writes(executed))
            entry.update(status="ok", seconds=round(time.time() - t0, 1))
            save()
            print(f"{nb.stem}: executed in {entry['seconds']:.0f} s")
        for c in commands:
            entry = {"command": "python -m freeatten_core experiments " + " ".join(c), "status": "running"}
            manifest["seed_runs"].append(entry)
            save()
            t0 = time.time()
            rc = experiments_main(c)
            entry.update(status="ok" if rc == 0 else f"failed (exit status {rc})", seconds=round(time.time() - t0, 1))
            save()
            if rc != 0:
                return 1
    finally:
        if env_before is None:
            os.environ.pop("FREEATTEN_RECORD_EXPECTED", None)
        else:
            os.environ["FREEATTEN_RECORD_EXPECTED"] = env_before
    print(f"wrote {out / 'manifest.json'}")
    return 0


def _rel(path: Path) -> Path:
    try:
        return path.resolve().relative_to(ROOT)
    except ValueError:
        return path


if __name__ == "__main__":
    sys.exit(main())

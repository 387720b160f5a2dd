"""Generate a 3 x 4 sweep (Reynolds number x grid resolution) as a distribute job file.

    python3 examples/sweep/make_sweep.py        # writes distribute-jobs.yaml and inputs/ here
    python3 distribute.py run examples/sweep/distribute-jobs.yaml

Each job runs solve.py with its own input/params.json, e.g. {"nx": 128, "re": 1000}
for the job re_1000-nx_128.  Rerunning this script rewrites the same files.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

try:
    import distribute
except ImportError:     # run from a checkout: use the distribute.py at the repository's root
    sys.path.insert(0, str(HERE.parent.parent))
    import distribute


def main() -> None:
    batch = distribute.Batch("examples", "channel_sweep", flavour="python",
                             capabilities=["python3"], build=HERE / "build.py")
    jobs = distribute.sweep(batch, {"re": [100, 1000, 10000], "nx": [16, 32, 64, 128]},
                            folder=HERE / "inputs", file=HERE / "solve.py")
    path = batch.write(HERE / "distribute-jobs.yaml")
    print(f"wrote {path} with {len(jobs)} jobs ({jobs[0].name} ... {jobs[-1].name})")


if __name__ == "__main__":
    main()

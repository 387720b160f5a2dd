"""One job: read input/case.json, integrate, save distribute_save/trajectory.csv."""
import json
import os

from solver import integrate   # written by build.py into the build directory

settings = json.load(open("input/settings.json"))
case = json.load(open("input/case.json"))
steps = settings["steps"]
with open("distribute_save/trajectory.csv", "w") as out, open(os.environ["DISTRIBUTE_PROGRESS"], "w") as progress:
    out.write("t,x\n")
    for i, (t, x) in enumerate(integrate(case["damping"], steps, settings["dt"])):
        out.write(f"{t:.3f},{x:.6f}\n")
        if i % (steps // 10) == 0:
            progress.write(f"{i}/{steps}\n")
            progress.flush()
print(f"{os.environ['DISTRIBUTE_JOB']}: damping {case['damping']} done on {os.environ['DISTRIBUTE_CPUS']} cpus")

# Runs once per job: reads its parameters from input/params.json, estimates the
# friction factor of a channel flow at that Reynolds number and grid, and saves it.
import json
import math
import os

params = json.load(open("input/params.json"))
constants = json.load(open("solver_constants.json"))
re_number, nx = params["re"], params["nx"]

# Fixed-point iteration of the Colebrook-like log law; finer grids take more steps.
friction = 0.02
for step in range(nx):
    friction = (constants["kappa"] / math.log(re_number * math.sqrt(friction) + constants["b"])) ** 2
    with open(os.environ["DISTRIBUTE_PROGRESS"], "a") as progress:
        progress.write(f"{step + 1}/{nx}\n")

with open("distribute_save/result.json", "w") as out:
    json.dump({"re": re_number, "nx": nx, "friction_factor": friction}, out, indent=2)
print(f"re={re_number} nx={nx}: friction factor {friction:.5f}")

# Runs once per machine: "compiles" the solver, here a table of wall-friction
# constants that every job reads from the build directory.
import json

with open("solver_constants.json", "w") as out:
    json.dump({"kappa": 0.41, "b": 5.2}, out)
print("solver ready")

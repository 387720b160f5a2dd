"""Runs once per machine and batch, in the build directory: 'compile' the solver."""
import pathlib

pathlib.Path("solver.py").write_text('''
def integrate(damping, steps, dt):
    x, v = 1.0, 0.0
    for step in range(steps):
        v += (-x - damping * v) * dt
        x += v * dt
        yield step * dt, x
''')
print("solver ready")

"""Property tests: whatever a user writes, the loaders answer with a UserError or a result.

Any other exception would reach the user as a traceback, which SPEC §7 forbids for bad input.
"""

import atexit
import itertools
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import distribute  # noqa: E402
from distribute import UserError  # noqa: E402

# One folder for every example: holds the files job files may name, and the file under test.
WORK = Path(tempfile.mkdtemp(prefix="distribute-fuzz-"))
atexit.register(shutil.rmtree, str(WORK), True)
for _name in ("build.py", "run.py", "a.txt", "b.csv", "image.sif"):
    (WORK / _name).write_text("x\n")
(WORK / "folder").mkdir()

SETTINGS = settings(max_examples=2000, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def dump(document):
    return yaml.dump(document, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), allow_unicode=True)


_COUNTER = itertools.count()


def load_text(loader, data):
    # a fresh name every time: truncating one file over and over is slow on some filesystems
    path = WORK / f"under_test_{next(_COUNTER)}.yaml"
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(data)
    try:
        loader(str(path))
    except UserError as exc:
        assert "\n" not in str(exc), str(exc)   # one line for the user
    finally:
        path.unlink()


# Raw YAML-ish text: fragments that exercise tags, anchors, flow and block syntax, odd scalars.
FRAGMENTS = st.sampled_from([
    "meta:", "python:", "apptainer:", "shell:", "slurm:", "nodes:", "jobs:", "initialize:",
    "batch_name:", "namespace:", "capabilities:", "matrix:", "name:", "file:", "command:",
    "required_files:", "required_mounts:", "build_file:", "sif:", "build:", "path:", "alias:",
    "retries:", "params:", "host:", "port:", "user:", "slots:", "workdir:", "time:", "cpus_per_task:",
    " ", "  ", "    ", "\n", "\n  ", "\n    - ", "- ", "\t", ": ", "{", "}", "[", "]", ",", "?", "|", ">",
    "&a ", "*a", "!!int ", "!!str ", "!!binary ", "!!timestamp ", "!!float ", "!!map ", "!!seq ", "!foo ",
    "~", "null", "true", "017", "0x1F", "0o7", "1:30", "1_000", "-1", "1e400", ".nan", "2024-01-01",
    "'", '"', '"\\0"', '"\\ud800"', "\\x", "#", "---", "...", "%YAML 1.1", "build.py", "run.py", "a.txt",
    "folder", "../x", "a/b", "/abs", "x; touch y", "lab1", "-oProxyCommand=x", "99999", "1" * 60,
])
YAMLISH = st.lists(FRAGMENTS, max_size=40).map("".join)


@SETTINGS
@given(st.one_of(YAMLISH, st.text(max_size=200), st.binary(max_size=200)))
def test_load_job_file_raw_text(data):
    load_text(distribute.load_job_file, data)


# Valid files with a few slots replaced by odd YAML values: reaches deep into the loaders,
# where purely random text rarely gets.
ODD_VALUES = st.one_of(st.sampled_from([
    "017", "1:30", "0x1F", "0o17", "0b101", "1_000", "-1", "0", "1e400", ".nan", ".inf", "99999999999",
    "1" * 5000, "!!int x", "!!int [1]", "!!int 1.5", "!!float x", "!!binary zz", "!!timestamp x", "!!null",
    "!!str 5", "!foo bar", "~", "''", "true", "2024-01-01", "[]", "{}", "[1, 2]", "{a: 1}", "[[[[[[1]]]]]]",
    "&a {x: *a}", "&b [*b]", "{a: !!binary zz}", "{a: !!float x}", "{a: 2024-01-01, b: [1, {c: d}]}",
    "{[1]: 2}", "{a: 1, a: 2}", '"a\\0b"', '"\\u00e9"', "'" + "x" * 5000 + "'", "a/b", "..", "../x",
    "/etc/hostname", "/no/such/file", "folder", "x; touch y", "-oProxyCommand=x", "lab1", "local",
    "a.txt", "run.py", "{path: a.txt, alias: ~}", "{path: a.txt, alias: a/b}", "{path: ~}", "{alias: x}",
    "{path: a.txt, extra: 1}", "[a.txt, a.txt]", "[a.txt, {path: b.csv, alias: a.txt}]", "[/scratch, x]",
    "{time: ~, nodes: 0}", "{gpus: 1}", "{cpus_per_task: many}", "@a:b.org", "[gpu, 'a b']", "[{}]",
]), st.text(max_size=30).map(json.dumps), st.integers().map(str))

TEMPLATE = {
    "python": """\
meta:
  batch_name: {batch}
  namespace: {namespace}
  capabilities: {caps}
  matrix: {matrix}
  resources: {resources}
  after: {after}
slurm: {slurm}
python:
  initialize:
    build_file: {build}
    required_files: {initial}
  jobs:
    - name: {name}
      file: {file}
      retries: {retries}
      slurm: {job_slurm}
      params: {params}
      required_files: {files}
      resources: {job_resources}
    - name: {name2}
      file: run.py
""",
    "apptainer": """\
meta: {{batch_name: {batch}, namespace: {namespace}}}
apptainer:
  initialize:
    sif: {build}
    required_files: {initial}
    required_mounts: {mounts}
  jobs:
    - name: {name}
      required_files: {files}
      retries: {retries}
""",
    "shell": """\
meta: {{batch_name: {batch}, namespace: {namespace}, capabilities: {caps}}}
shell:
  initialize: {{build: {command}, required_files: {initial}}}
  jobs:
    - {{name: {name}, command: {command}, params: {params}}}
    - {{name: {name2}, command: "true", slurm: {job_slurm}}}
""",
}
DEFAULTS = {"batch": "b1", "namespace": "ns", "caps": "[python3]", "matrix": "~", "slurm": "~",
            "build": "build.py", "initial": "[a.txt]", "name": "j1", "name2": "j2", "file": "run.py",
            "retries": "1", "job_slurm": "~", "params": "{x: 1}", "files": "[{path: b.csv, alias: c.csv}]",
            "mounts": "[/scratch]", "command": "echo", "resources": "{cpus: 2, memory: 4G, gpus: 1, time: 1h}",
            "after": "[ns/other, b0]", "job_resources": "{memory: 512M}"}


@SETTINGS
@given(st.sampled_from(sorted(TEMPLATE)), st.dictionaries(st.sampled_from(sorted(DEFAULTS)), ODD_VALUES, max_size=3))
def test_load_job_file_mutated(flavour, changes):
    values = dict(DEFAULTS, **changes)
    if flavour == "apptainer" and "build" not in changes:
        values["build"] = "image.sif"
    load_text(distribute.load_job_file, TEMPLATE[flavour].format(**values))


NODES_TEMPLATE = """\
nodes:
  - name: {name}
    host: {host}
    user: {user}
    port: {port}
    capabilities: {caps}
    slots: {slots}
    workdir: {workdir}
    python: {python}
    cpus: {cpus}
    memory: {memory}
    gpus: {gpus}
    reserve: {reserve}
  - {{name: {name2}, host: {host2}}}
"""
NODES_DEFAULTS = {"name": "lab1", "host": "lab1.example.edu", "user": "alice", "port": "22", "caps": "[gpu]",
                  "slots": "1", "workdir": "/var/tmp/d", "python": "python3", "name2": "lab2", "host2": "lab2",
                  "cpus": "16", "memory": "64G", "gpus": "2", "reserve": "{cpus: 2, memory: 8G}"}


@SETTINGS
@given(st.dictionaries(st.sampled_from(sorted(NODES_DEFAULTS)), ODD_VALUES, max_size=3))
def test_load_nodes_file_mutated(changes):
    load_text(distribute.load_nodes_file, NODES_TEMPLATE.format(**dict(NODES_DEFAULTS, **changes)))


# Structured documents: plausible job and nodes files with random values in every slot.  Built
# from a Random seeded by Hypothesis (deep composite strategies are far too slow for 2000 runs;
# a failure reports the seed, which reproduces the document).
ODD_TEXT = ["build.py", "run.py", "a.txt", "b.csv", "image.sif", "folder", "missing.txt", "../x", "a/b",
            "x; touch y", "job_1", "ns", "/scratch", "scratch", "@a:b.org", "python3", "", ".", "..", "gpu",
            "a,b", "/x:y", "1h", "lab1", "-oProxyCommand=x", "[::1]", "local", "a\0b", "\u00e9t\u00e9", "x" * 300]


def scalar(rnd):
    kind = rnd.randrange(7)
    if kind == 0:
        return None
    if kind == 1:
        return rnd.random() < 0.5
    if kind == 2:
        return rnd.choice([0, 1, 2, -1, 65535, 65536, 70000, 2 ** 70, -2 ** 70])
    if kind == 3:
        return rnd.choice([0.5, -1.0, float("inf"), float("nan"), 1e300])
    if kind == 4:
        return "".join(chr(rnd.randrange(1, 0x3000)) for _ in range(rnd.randrange(6)))
    return rnd.choice(ODD_TEXT)


def anything(rnd, depth=0):
    kind = rnd.randrange(6 if depth < 3 else 1)
    if kind <= 3:
        return scalar(rnd)
    if kind == 4:
        return [anything(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    return {scalar(rnd) if rnd.random() < 0.3 else rnd.choice(ODD_TEXT): anything(rnd, depth + 1)
            for _ in range(rnd.randrange(4))}


def shaped(rnd, make):
    """Mostly the expected shape, sometimes anything at all."""
    return make() if rnd.random() < 0.85 else anything(rnd)


def some_keys(rnd, options):
    """A mapping with a random subset of the given keys (plus, rarely, an unknown one)."""
    out = {key: make() for key, make in options.items() if rnd.random() < 0.8}
    if rnd.random() < 0.05:
        out["unknown"] = anything(rnd)
    return out


def resources(rnd):
    values = {"cpus": lambda: shaped(rnd, lambda: rnd.choice([1, 4, 0, -1])),
              "memory": lambda: shaped(rnd, lambda: rnd.choice(["16G", "512M", "1.5T", "0G", "lots", 7])),
              "gpus": lambda: shaped(rnd, lambda: rnd.choice([0, 2, -1])),
              "time": lambda: shaped(rnd, lambda: rnd.choice(["2h", "90m", "0s", "1d"]))}
    return shaped(rnd, lambda: some_keys(rnd, values))


def file_spec(rnd):
    files = ["build.py", "run.py", "a.txt", "b.csv", "image.sif", "folder", "missing", "../a.txt"]
    if rnd.random() < 0.5:
        return shaped(rnd, lambda: rnd.choice(files))
    return shaped(rnd, lambda: some_keys(rnd, {"path": lambda: shaped(rnd, lambda: rnd.choice(files)),
                                               "alias": lambda: scalar(rnd)}))


def slurm(rnd):
    keys = list(distribute.SLURM_KEYS) + ["gpus"]
    return shaped(rnd, lambda: {rnd.choice(keys): scalar(rnd) for _ in range(rnd.randrange(4))})


def file_list(rnd):
    return shaped(rnd, lambda: [file_spec(rnd) for _ in range(rnd.randrange(4))])


def job_document(rnd):
    def section(flavour):
        job_keys = {"name": lambda: shaped(rnd, lambda: rnd.choice(["j1", "j2", "j3", "../x", "a b"])),
                    "required_files": lambda: file_list(rnd), "retries": lambda: scalar(rnd),
                    "slurm": lambda: slurm(rnd), "params": lambda: anything(rnd),
                    "resources": lambda: resources(rnd)}
        job_keys.update({"python": {"file": lambda: file_spec(rnd)}, "shell": {"command": lambda: scalar(rnd)},
                         "apptainer": {}}[flavour])
        init_keys = {"python": {"build_file": lambda: file_spec(rnd)}, "shell": {"build": lambda: scalar(rnd)},
                     "apptainer": {"sif": lambda: file_spec(rnd),
                                   "required_mounts": lambda: shaped(rnd, lambda: [scalar(rnd), "/scratch"])}}[flavour]
        init_keys["required_files"] = lambda: file_list(rnd)
        return shaped(rnd, lambda: some_keys(rnd, {
            "initialize": lambda: shaped(rnd, lambda: some_keys(rnd, init_keys)),
            "jobs": lambda: shaped(rnd, lambda: [shaped(rnd, lambda: some_keys(rnd, job_keys))
                                                 for _ in range(rnd.randrange(4))])}))

    document = some_keys(rnd, {
        "meta": lambda: shaped(rnd, lambda: some_keys(rnd, {
            "batch_name": lambda: shaped(rnd, lambda: "b1"), "namespace": lambda: shaped(rnd, lambda: "ns"),
            "capabilities": lambda: shaped(rnd, lambda: [scalar(rnd), "python3"]),
            "matrix": lambda: scalar(rnd), "resources": lambda: resources(rnd),
            "after": lambda: shaped(rnd, lambda: [rnd.choice(["ns/b0", "b1", "ns/b1", "a/b/c", scalar(rnd)])]),
            "after_failed": lambda: shaped(rnd, lambda: rnd.choice(["wait", "start", "maybe"]))})),
        "slurm": lambda: slurm(rnd)})
    flavours = [f for f in ("python", "shell", "apptainer") if rnd.random() < 0.4] or [rnd.choice(["python", "shell"])]
    for flavour in flavours:
        document[flavour] = section(flavour)
    return document


@SETTINGS
@given(st.integers(min_value=0, max_value=2 ** 64))
def test_load_job_file_structured(seed):
    load_text(distribute.load_job_file, dump(job_document(random.Random(seed))))


def nodes_document(rnd):
    node_keys = {
        "name": lambda: shaped(rnd, lambda: rnd.choice(["lab1", "lab2", "../x"])),
        "host": lambda: shaped(rnd, lambda: rnd.choice(ODD_TEXT)), "user": lambda: scalar(rnd),
        "port": lambda: shaped(rnd, lambda: rnd.randrange(-5, 70000)),
        "capabilities": lambda: shaped(rnd, lambda: [scalar(rnd), "gpu"]), "slots": lambda: scalar(rnd),
        "workdir": lambda: scalar(rnd), "python": lambda: scalar(rnd),
        "cpus": lambda: scalar(rnd), "memory": lambda: shaped(rnd, lambda: rnd.choice(["8G", "x", 3])),
        "gpus": lambda: scalar(rnd), "reserve": lambda: resources(rnd)}
    return some_keys(rnd, {"nodes": lambda: shaped(rnd, lambda: [shaped(rnd, lambda: some_keys(rnd, node_keys))
                                                                 for _ in range(rnd.randrange(4))])})


@SETTINGS
@given(st.one_of(st.integers(min_value=0, max_value=2 ** 64).map(lambda seed: dump(nodes_document(random.Random(seed)))),
                 YAMLISH, st.text(max_size=200)))
def test_load_nodes_file(data):
    load_text(distribute.load_nodes_file, data)


@SETTINGS
@given(st.one_of(
    st.text(max_size=30),
    st.lists(st.sampled_from(["1", "0", "99", "h", "m", "s", " ", "H", "9" * 30, "-", "٣", "1.5"]), max_size=8)
    .map("".join)),
    st.one_of(st.none(), st.floats(min_value=0, max_value=1e7)))
def test_parse_duration(text, maximum):
    try:
        seconds = distribute.parse_duration(text, maximum)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(seconds, int) and seconds > 0
    assert maximum is None or seconds <= maximum

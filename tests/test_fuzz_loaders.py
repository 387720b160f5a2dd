"""Property tests: whatever a user writes, the loaders answer with a UserError or a result.

Any other exception would reach the user as a traceback, which SPEC §7 forbids for bad input.
"""

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
for _name in ("build.py", "run.py", "a.txt", "b.csv", "image.sif"):
    (WORK / _name).write_text("x\n")
(WORK / "folder").mkdir()

SETTINGS = settings(max_examples=2000, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def dump(document):
    return yaml.dump(document, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), allow_unicode=True)


def load_text(loader, data):
    path = WORK / "under_test.yaml"
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(data)
    try:
        loader(str(path))
    except UserError as exc:
        assert "\n" not in str(exc), str(exc)   # one line for the user


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


# Structured documents: plausible job files with random values in every slot.
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.sampled_from([0.5, -1.0, float("inf"), float("nan"), 1e300]),
    st.sampled_from(["build.py", "run.py", "a.txt", "b.csv", "image.sif", "folder", "missing.txt", "../x",
                     "a/b", "x; touch y", "job_1", "ns", "/scratch", "scratch", "@a:b.org", "python3", "",
                     ".", "..", "gpu", "a,b", "/x:y", "1h"]),
    st.text(max_size=10),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(SCALARS, inner, max_size=3)),
    max_leaves=5)


def maybe(strategy):
    """Mostly the right shape, sometimes anything at all."""
    return st.one_of(strategy, strategy, strategy, VALUES)


FILE_SPEC = maybe(st.one_of(
    st.sampled_from(["build.py", "run.py", "a.txt", "b.csv", "missing", "folder", "image.sif"]),
    st.fixed_dictionaries({"path": SCALARS}, optional={"alias": SCALARS})))
SLURM = maybe(st.dictionaries(st.sampled_from(list(distribute.SLURM_KEYS) + ["gpus"]), SCALARS, max_size=4))


def section(flavour):
    job_keys = {"name": maybe(st.sampled_from(["j1", "j2", "../x", "a b"])), "required_files": st.lists(FILE_SPEC),
                "retries": SCALARS, "slurm": SLURM, "params": VALUES}
    job_keys.update({"python": {"file": FILE_SPEC}, "shell": {"command": SCALARS}, "apptainer": {}}[flavour])
    init_keys = {"python": {"build_file": FILE_SPEC}, "shell": {"build": SCALARS},
                 "apptainer": {"sif": FILE_SPEC, "required_mounts": maybe(st.lists(SCALARS, max_size=3))}}[flavour]
    init_keys["required_files"] = maybe(st.lists(FILE_SPEC, max_size=3))
    job = st.fixed_dictionaries({}, optional=job_keys)
    return st.fixed_dictionaries({}, optional={
        "initialize": maybe(st.fixed_dictionaries({}, optional=init_keys)),
        "jobs": maybe(st.lists(job, max_size=4))})


DOCUMENTS = st.fixed_dictionaries({}, optional={
    "meta": maybe(st.fixed_dictionaries({}, optional={
        "batch_name": SCALARS, "namespace": SCALARS, "capabilities": maybe(st.lists(SCALARS, max_size=3)),
        "matrix": SCALARS})),
    "python": section("python"), "shell": section("shell"), "apptainer": section("apptainer"),
    "slurm": SLURM, "extra": VALUES})


@SETTINGS
@given(DOCUMENTS)
def test_load_job_file_structured(document):
    load_text(distribute.load_job_file, dump(document))


NODE = st.fixed_dictionaries({}, optional={
    "name": maybe(st.sampled_from(["lab1", "lab2", "../x"])),
    "host": maybe(st.sampled_from(["lab1.example.edu", "local", "-oProxyCommand=x", "a b", "[::1]", ""])),
    "user": SCALARS, "port": maybe(st.integers(min_value=-5, max_value=70000)),
    "capabilities": maybe(st.lists(SCALARS, max_size=3)), "slots": SCALARS, "workdir": SCALARS,
    "python": SCALARS, "extra": SCALARS})


@SETTINGS
@given(st.one_of(
    st.fixed_dictionaries({}, optional={"nodes": maybe(st.lists(NODE, max_size=4)), "other": VALUES})
    .map(dump),
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

"""The Python API: Batch/File, sweep, and the --where expression language."""

import dataclasses
import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import distribute
from distribute import Batch, File, SlurmOptions, UserError, load_job_file, parse_where, sweep

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sweep"


def touch(path: Path, text: str = "x\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def without_path(job_file):
    return dataclasses.replace(job_file, path="")


# --- building job files in code --------------------------------------------

def test_python_batch_written_and_loaded_matches(tmp_path):
    build, run = touch(tmp_path / "build.py"), touch(tmp_path / "run.py")
    shared, case = touch(tmp_path / "data" / "mesh.dat"), touch(tmp_path / "cases" / "a.json")
    batch = Batch("alice", "sweep_1", "python", capabilities=["python3", "gpu"], matrix="@alice:example.org",
                  build=build, initial_files=[shared, File(case, "case.json")],
                  slurm=SlurmOptions(time="01:00:00", ntasks=4))
    batch.add_job("one", file=run, files=[File(case, "input.json")], retries=2, params={"re": 100, "dt": 0.5},
                  slurm={"partition": "long"})
    batch.add_job("two", file=str(run))
    target = batch.write(tmp_path / "distribute-jobs.yaml")

    loaded = load_job_file(str(target))
    assert without_path(loaded) == without_path(batch.validate())
    assert loaded.meta == distribute.Meta("sweep_1", "alice", ["python3", "gpu"], "@alice:example.org")
    assert loaded.build == distribute.FileSpec(str(build), "build.py")
    assert [(f.path, f.alias) for f in loaded.initial_files] == [(str(shared), "mesh.dat"), (str(case), "case.json")]
    one, two = loaded.jobs
    assert (one.name, one.file.path, one.file.alias, one.retries) == ("one", str(run), "job.py", 2)
    assert one.params == {"re": 100, "dt": 0.5}
    assert one.required_files == [distribute.FileSpec(str(case), "input.json")]
    assert one.slurm == SlurmOptions(partition="long")
    assert loaded.slurm == SlurmOptions(time="01:00:00", ntasks=4)
    assert (two.params, two.retries, two.slurm) == (None, 0, None)
    text = target.read_text()
    assert "build_file: build.py" in text and "path: cases/a.json" in text and str(tmp_path) not in text


def test_shell_batch_round_trip(tmp_path):
    text = touch(tmp_path / "text.txt")
    batch = Batch("bob", "words", "shell", build_command="mkdir -p bin", initial_files=[text])
    batch.add_job("count", command="wc -w input/text.txt > distribute_save/n.txt", params={"kind": "wc"})
    loaded = load_job_file(str(batch.write(tmp_path)))
    assert loaded.flavour == "shell" and loaded.build_command == "mkdir -p bin"
    assert loaded.jobs[0].command == "wc -w input/text.txt > distribute_save/n.txt"
    assert loaded.jobs[0].params == {"kind": "wc"}
    assert without_path(loaded) == without_path(batch.validate())


def test_resources_and_after_in_code(tmp_path):
    batch = Batch("bob", "post", "shell", resources={"cpus": 4, "memory": "16G", "time": "2h"},
                  after=["bob/sweep"])
    batch.add_job("big", command="true", resources={"gpus": 1})
    batch.add_job("plain", command="true")
    loaded = load_job_file(str(batch.write(tmp_path)))
    assert loaded.meta.after == ["bob/sweep"]
    assert loaded.jobs[0].resources == distribute.Resources(cpus=4, memory=16 << 30, gpus=1, time=7200)
    assert loaded.jobs[1].resources == distribute.Resources(cpus=4, memory=16 << 30, time=7200)
    broken = Batch("bob", "post", "shell", resources={"memory": "lots"})
    broken.add_job("x", command="true")
    with pytest.raises(UserError, match=r"batch bob/post: .*resources.memory: size 'lots' is not like 16G"):
        broken.validate()


def test_apptainer_batch_round_trip(tmp_path):
    sif, small = touch(tmp_path / "solver.sif"), touch(tmp_path / "small.json")
    batch = Batch("carol", "cfd", "apptainer", capabilities=["apptainer"], sif=File(sif, "image.sif"),
                  mounts=["/scratch"])
    batch.add_job("small", files=[File(small, "case.json")])
    loaded = load_job_file(str(batch.write(tmp_path / "jobs.yaml")))
    assert loaded.build == distribute.FileSpec(str(sif), "image.sif")
    assert loaded.mounts == ["/scratch"] and loaded.jobs[0].required_files[0].alias == "case.json"


def test_files_outside_the_folder_are_written_absolute(tmp_path):
    run = touch(tmp_path / "elsewhere" / "run.py")
    batch = Batch("a", "b", build=touch(tmp_path / "here" / "build.py"))
    batch.add_job("j", file=run)
    target = batch.write(tmp_path / "here" / "distribute-jobs.yaml")
    assert f"file: {run}" in target.read_text()
    assert load_job_file(str(target)).jobs[0].file.path == str(run)


def test_from_file_round_trips_the_examples(tmp_path):
    for flavour in ("python", "shell", "apptainer"):
        original = load_job_file(str(ROOT / "examples" / flavour / "distribute-jobs.yaml"))
        copy = Batch.from_file(ROOT / "examples" / flavour / "distribute-jobs.yaml")
        again = load_job_file(str(copy.write(tmp_path / flavour / "distribute-jobs.yaml")))
        assert without_path(again) == without_path(original)


def test_invalid_batches_raise_user_errors_naming_the_batch(tmp_path):
    run = touch(tmp_path / "run.py")
    missing = Batch("a", "b", build=tmp_path / "nope.py")
    missing.add_job("j", file=run)
    with pytest.raises(UserError, match=r"^batch a/b: python.initialize.build_file: file .*nope.py.* does not exist"):
        missing.validate()
    with pytest.raises(UserError, match="does not exist"):
        missing.write(tmp_path / "out.yaml")
    assert not (tmp_path / "out.yaml").exists() and list(tmp_path.iterdir()) == [run]

    no_build = Batch("a", "b")
    no_build.add_job("j", file=run)
    with pytest.raises(UserError, match="missing required key 'build_file'"):
        no_build.validate()
    empty = Batch("a", "b", build=run)
    with pytest.raises(UserError, match="the job list is empty"):
        empty.validate()
    bad_slurm = Batch("a", "b", build=run, slurm={"walltime": "1h"})
    bad_slurm.add_job("j", file=run)
    with pytest.raises(UserError, match=r"^batch a/b: slurm.walltime: unknown key"):
        bad_slurm.validate()
    clash = Batch("a", "b", build=run, initial_files=[File(run, "x.json")])
    clash.add_job("j", file=run, files=[File(touch(tmp_path / "other"), "x.json")])
    with pytest.raises(UserError, match="'x.json' is both an initialize file and a file of this job"):
        clash.validate()
    unrepresentable = Batch("a", "b", build=run)
    unrepresentable.add_job("j", file=run, params={"x": object()})
    with pytest.raises(UserError, match="cannot be written as YAML"):
        unrepresentable.validate()


@pytest.mark.parametrize("make, message", [
    (lambda: Batch("a", "b", "fortran"), "Batch flavour 'fortran'"),
    (lambda: Batch("a/b", "c"), "Batch namespace: 'a/b' is not a valid name"),
    (lambda: Batch("a", "-c"), "Batch name: '-c' is not a valid name"),
    (lambda: Batch("a", "b", "python", build_command="make"), "build_command= is only for shell"),
    (lambda: Batch("a", "b", "shell", sif="x.sif"), "sif= is only for apptainer"),
    (lambda: Batch("a", "b", "python", build=3), "build: expected a path or File"),
    (lambda: Batch("a", "b").add_job("j"), "a python job needs file="),
    (lambda: Batch("a", "b", "shell").add_job("j"), "a shell job needs command="),
    (lambda: Batch("a", "b", "shell").add_job("j", command="x", file="y"), "file= is only for python"),
    (lambda: Batch("a", "b", "apptainer").add_job("j", command="x"), "command= is only for shell"),
    (lambda: Batch("a", "b").add_job("../j", file="x"), "job name: '../j' is not a valid name"),
    (lambda: Batch("a", "b").add_job("j", file="x", params=[1]), "params must be a dict"),
])
def test_bad_arguments_are_user_errors(make, message):
    with pytest.raises(UserError, match=f"^.*{message}"):
        make()


def test_duplicate_job_name_is_refused():
    batch = Batch("a", "b", "shell")
    batch.add_job("j", command="true")
    with pytest.raises(UserError, match="job name 'j' is used twice"):
        batch.add_job("j", command="false")


# --- sweeps -----------------------------------------------------------------

def test_sweep_product_names_order_and_inputs(tmp_path):
    batch = Batch("a", "b", build=touch(tmp_path / "build.py"))
    jobs = sweep(batch, {"re": [100, 1000], "dt": [0.5, 1e-05, 2.0]}, tmp_path / "inputs",
                 file=touch(tmp_path / "run.py"))
    assert [j.name for j in jobs] == ["re_100-dt_0.5", "re_100-dt_1e-05", "re_100-dt_2.0",
                                      "re_1000-dt_0.5", "re_1000-dt_1e-05", "re_1000-dt_2.0"]
    assert jobs[1].params == {"re": 100, "dt": 1e-05}
    for job in jobs:
        (params_file,) = job.files
        assert params_file.alias == "params.json"
        assert Path(params_file.path) == tmp_path / "inputs" / f"{job.name}.json"
        assert json.loads(Path(params_file.path).read_text()) == job.params
    loaded = load_job_file(str(batch.write(tmp_path)))
    assert [j.params for j in loaded.jobs] == [j.params for j in jobs]
    assert [j.required_files[0].alias for j in loaded.jobs] == ["params.json"] * 6


def test_sweep_zip_custom_writer_alias_and_extra_options(tmp_path):
    batch = Batch("a", "b", "shell")
    shared = touch(tmp_path / "mesh.dat")

    def write_ini(path, params):
        path.write_text("".join(f"{k} = {v}\n" for k, v in params.items()))

    jobs = sweep(batch, {"solver": ["piso", "simple foam"], "cfl": [0.5, 1]}, tmp_path / "in", zip=True,
                 alias="case.ini", writer=write_ini, command="cat input/case.ini", files=[shared], retries=1)
    assert [j.name for j in jobs] == ["solver_piso-cfl_0.5", "solver_simple_foam-cfl_1"]
    assert (tmp_path / "in" / "solver_simple_foam-cfl_1.ini").read_text() == "solver = simple foam\ncfl = 1\n"
    assert [f.alias for f in jobs[0].files] == [None, "case.ini"]
    assert [f.alias for f in batch.validate().jobs[0].required_files] == ["mesh.dat", "case.ini"]
    assert all(j.retries == 1 and j.command == "cat input/case.ini" for j in jobs)


def test_sweep_names_are_sanitised_and_custom_names_used(tmp_path):
    batch = Batch("a", "b", "shell")
    jobs = sweep(batch, {"_case": ["a/b c", True, None], "x": [-1.5]}, tmp_path, command="true")
    assert [j.name for j in jobs] == ["case_a_b_c-x_-1.5", "case_true-x_-1.5", "case_none-x_-1.5"]
    for job in jobs:
        assert distribute.name_problem(job.name) is None
    named = sweep(Batch("a", "c", "shell"), {"n": [1, 2]}, tmp_path / "named", command="true",
                  name=lambda p: f"run{p['n']:03d}")
    assert [j.name for j in named] == ["run001", "run002"]
    assert distribute.sweep_job_name({"k": "x" * 300}) == ("k_" + "x" * 300)[:128]


def test_sweep_errors(tmp_path):
    batch = Batch("a", "b", "shell")
    with pytest.raises(UserError, match=r"sweep\(zip=True\): .*equal lengths \(re has 3, nx has 2\)"):
        sweep(batch, {"re": [1, 2, 3], "nx": [1, 2]}, tmp_path, zip=True, command="true")
    with pytest.raises(UserError, match=r"parameters \{'v': 'a b'\} and \{'v': 'a_b'\} both give the job name 'v_a_b'"):
        sweep(batch, {"v": ["a b", "a_b"]}, tmp_path, command="true")
    with pytest.raises(UserError, match="both give the job name 'v_1'"):
        sweep(batch, {"v": [1, 1]}, tmp_path, command="true")
    with pytest.raises(UserError, match="has no values"):
        sweep(batch, {"v": []}, tmp_path, command="true")
    with pytest.raises(UserError, match="needs a list of values, found str"):
        sweep(batch, {"v": "abc"}, tmp_path, command="true")
    with pytest.raises(UserError, match="non-empty dict"):
        sweep(batch, {}, tmp_path, command="true")
    with pytest.raises(UserError, match="alias 'a/b' must be a plain file name"):
        sweep(batch, {"v": [1]}, tmp_path, alias="a/b", command="true")
    with pytest.raises(UserError, match="cannot write .* as JSON"):
        sweep(batch, {"v": [{1, 2}]}, tmp_path, command="true")
    assert batch.jobs == []     # a sweep that fails half-way adds no job
    sweep(batch, {"v": [7]}, tmp_path / "ok", command="true")
    with pytest.raises(UserError, match="'v_7' .* is already a job of batch a/b"):
        sweep(batch, {"v": [7]}, tmp_path / "again", command="true")
    assert [j.name for j in batch.jobs] == ["v_7"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


# --- the example sweep ------------------------------------------------------

def test_example_generator_is_idempotent_and_matches_the_committed_files(tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(EXAMPLE, copy)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for _ in range(2):
        out = subprocess.run([sys.executable, str(copy / "make_sweep.py")], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "with 12 jobs" in out.stdout
    diff = filecmp.dircmp(EXAMPLE, copy, ignore=["__pycache__"])
    assert diff.diff_files == [] and diff.left_only == [] and diff.right_only == []
    sub = filecmp.dircmp(EXAMPLE / "inputs", copy / "inputs")
    assert sub.diff_files == [] and sub.left_only == [] and sub.right_only == [] and len(sub.same_files) == 12


def test_example_runs_with_the_cli_and_keeps_params(tmp_path):
    save = tmp_path / "results"
    out = subprocess.run([sys.executable, str(ROOT / "distribute.py"), "run",
                          str(EXAMPLE / "distribute-jobs.yaml"), "--save-dir", str(save)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "12 ok, 0 failed" in out.stdout
    jobs = sorted((save / "examples" / "channel_sweep").glob("re_*"))
    assert len(jobs) == 12
    for folder in jobs:
        record = json.loads((folder / "job.json").read_text())
        re_text, nx_text = folder.name[len("re_"):].split("-nx_")
        assert record["params"] == {"re": int(re_text), "nx": int(nx_text)}
        assert record["exit_code"] == 0
        result = json.loads((folder / "result.json").read_text())
        assert (result["re"], result["nx"]) == (int(re_text), int(nx_text))
        assert 0 < result["friction_factor"] < 1


# --- --where ------------------------------------------------------------------

ROWS = [
    {"re": 100, "nx": 64, "solver": "piso", "dt": 0.001, "gpu": True},
    {"re": 1000, "nx": 128, "solver": "simple", "dt": 0.05, "gpu": False},
    {"re": 10000, "nx": 128, "solver": "piso", "dt": 0.01},
    {"re": 1000.0, "solver": "it's"},
    {},
]


@pytest.mark.parametrize("expr, expected", [
    ("re>=1000 and nx==128", [False, True, True, False, False]),
    ('solver == "piso" or not (dt < 0.01)', [True, True, True, True, True]),
    ("re == 1000", [False, True, False, True, False]),
    ("re != 1000", [True, False, True, False, False]),
    ("re < 1e3", [True, False, False, False, False]),
    ("re <= 1000 and re > 100", [False, True, False, True, False]),
    ("gpu == true", [True, False, False, False, False]),
    ("gpu == False", [False, True, False, False, False]),
    ("gpu != true", [False, True, False, False, False]),
    ("solver > 'q'", [False, True, False, False, False]),
    ("solver == 'it\\'s'", [False, False, False, True, False]),
    ("solver == 1000", [False, False, False, False, False]),
    ("solver != 1000", [True, True, True, True, False]),
    ("re == '1000'", [False, False, False, False, False]),
    ("gpu < true", [False, False, False, False, False]),
    ("not nx == 128", [True, False, False, True, True]),
    ("not not nx==128", [False, True, True, False, False]),
    ("(re==100 or re==10000) and (solver=='piso')", [True, False, True, False, False]),
    ("re==100 or re==1000 and nx==64", [True, False, False, False, False]),
    ("dt >= -1 and dt <= +.5", [True, True, True, False, False]),
    ("((((re > 0))))", [True, True, True, True, False]),
])
def test_where_truth_table(expr, expected):
    test = parse_where(expr)
    assert [test(row) for row in ROWS] == expected


@pytest.mark.parametrize("expr, message", [
    ("re>=", "expected a value (a number, 'text', true or false) at column 5, found the end"),
    ("", "expected a parameter name, 'not' or '(' at column 1, found the end"),
    ("re = 1", "'=' is not an operator (use '==') at column 4"),
    ("!(re==1)", "'!' is not an operator (use '!=' or 'not') at column 1"),
    ("re == 'abc", "unterminated string starting at column 7"),
    ("(re==1", "expected ')' at column 7, found the end; the '(' at column 1 is not closed"),
    ("re==1)", "expected 'and', 'or' or the end at column 6, found ')'"),
    ("re==1 nx==2", "expected 'and', 'or' or the end at column 7, found 'nx'"),
    ("re 1", "expected a comparison (== != < <= > >=) after 're' at column 4, found '1'"),
    ("1 < re", "expected a parameter name, 'not' or '(' at column 1, found '1'"),
    ("re == nx", "expected a value (a number, 'text', true or false) at column 7, found 'nx'"),
    ("re==1 and", "expected a parameter name, 'not' or '(' at column 10, found the end"),
    ("re==1 or or nx==2", "at column 10, found 'or'"),
    ("re == 1 % 2", "unexpected character '%' at column 9"),
    ("__import__('os')==1", "expected a comparison (== != < <= > >=) after '__import__' at column 11, found '('"),
    ("re==1.2.3", "expected 'and', 'or' or the end at column 8, found '.3'"),
    ("not " * 51 + "re==1", "nested more than 50 deep at column 201"),
    ("(" * 60 + "re==1" + ")" * 60, "nested more than 50 deep at column 51"),
])
def test_where_syntax_errors_name_the_column(expr, message):
    with pytest.raises(UserError) as caught:
        parse_where(expr)
    assert str(caught.value).startswith(f"--where {expr!r}: ")
    assert str(caught.value).endswith(message)
    assert "\n" not in str(caught.value)


def test_where_limits_length_and_type():
    with pytest.raises(UserError, match="1001 characters long, the limit is 1000"):
        parse_where("a" * 1001)
    with pytest.raises(UserError, match="expected text"):
        parse_where(None)
    long_ok = " or ".join(["re==1"] * 100)
    assert len(long_ok) <= 1000 and parse_where(long_ok)({"re": 1}) is True
    assert parse_where("re==1")(None) is False


WHERE_PIECES = ["re", "nx", "solver", "and", "or", "not", "(", ")", "==", "!=", "<", "<=", ">", ">=",
                "=", "!", "1", "-2.5", ".5", "1e3", "'piso'", '"a\\"b"', "'", '"', "true", "false",
                " ", "\t", "\\", "_x", "é", "\x00"]


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(st.sampled_from(WHERE_PIECES), max_size=25).map(" ".join),
                 st.lists(st.sampled_from(WHERE_PIECES), max_size=25).map("".join)))
def test_where_never_raises_anything_but_user_error(expr):
    try:
        test = parse_where(expr)
    except UserError as exc:
        assert str(exc).startswith("--where ") and "\n" not in str(exc)
        return
    for row in ROWS + [{"re": "x", "nx": None, "solver": [1], "_x": float("nan")}]:
        assert test(row) in (True, False)

"""Job files and nodes files: what loads (compat files, templates, nulls) and what is refused.

Bad job files go through the real CLI (`distribute.py check`) because the promise is about what
the user sees: exit code 2, exactly one line on stderr naming the file, the line and the key,
and never a traceback.  Nodes files have no command of their own yet, so their loader is called
directly.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import distribute  # noqa: E402
from distribute import UserError, load_job_file, load_nodes_file  # noqa: E402

COMPAT = ROOT / "tests" / "fixtures" / "compat"


def cli(*args, cwd=None, env=None):
    """Run the real command line; returns the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, str(ROOT / "distribute.py"), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def write_files(folder: Path, files):
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


# Files every bad-input case may name; a case only fails for the reason it is about.
SUPPORT = {"build.py": "print('build')\n", "run.py": "print('run')\n", "shared.txt": "shared\n",
           "a.txt": "a\n", "b.txt": "b\n", "other/shared.txt": "other\n", "image.sif": "sif\n"}

GOOD_HEAD = """\
meta:
  batch_name: sweep_1
  namespace: alice
  capabilities: [python3]
"""

# Each case: (id, YAML text, key path expected in the message or None).  The line the error
# must name is marked with `#<` in the text (None: the message names no line).
BAD_JOB_FILES = [
    ("yaml_syntax_error", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs:
    - name: j1
      file: [run.py
    - name: j2   #<
""", None),
    ("yaml_tab_indent", GOOD_HEAD + "python:\n\tjobs: []   #<\n", None),
    ("unknown_key", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs:
    - name: j1
      fiel: run.py   #<
""", "python.jobs[0].fiel"),
    ("unknown_top_level_key", GOOD_HEAD + "pyhton:   #<\n  jobs: []\n", "pyhton"),
    ("wrong_type_retries", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs:
    - name: j1
      file: run.py
    - name: j2
      file: run.py
      retries: three   #<
""", "python.jobs[1].retries"),
    ("negative_retries", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs:
    - name: j1
      file: run.py
      retries: -1   #<
""", "python.jobs[0].retries"),
    ("wrong_type_jobs_mapping", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs:
    name: j1   #<
""", "python.jobs"),
    ("duplicate_job_names", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs:
    - name: j1
      file: run.py
    - name: j1   #<
      file: run.py
""", "python.jobs[1].name"),
    ("missing_input_file", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs:
    - name: j1
      file: run.py
      required_files:
        - path: no_such_file.csv   #<
""", "python.jobs[0].required_files[0].path"),
    ("missing_job_script", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs:
    - name: j1
      file: nope.py   #<
""", "python.jobs[0].file"),
    ("missing_build_file", GOOD_HEAD + """\
python:
  initialize:
    build_file: {path: not_there.py}   #<
  jobs:
    - name: j1
      file: run.py
""", "python.initialize.build_file.path"),
    ("no_build_file_key", GOOD_HEAD + """\
python:
  initialize:
    required_files: [shared.txt]   #<
  jobs:
    - name: j1
      file: run.py
""", "python.initialize"),
    ("input_is_a_directory", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs:
    - name: j1
      file: run.py
      required_files: [other]   #<
""", "python.jobs[0].required_files[0]"),
    ("name_dotdot", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs:
    - name: ../x   #<
      file: run.py
""", "python.jobs[0].name"),
    ("name_with_slash", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs:
    - name: j1
      file: run.py
    - name: a/b   #<
      file: run.py
""", "python.jobs[1].name"),
    ("name_shell_injection", GOOD_HEAD + """\
shell:
  jobs:
    - name: "x; touch PWNED"   #<
      command: "true"
""", "shell.jobs[0].name"),
    ("bad_namespace", """\
meta:
  batch_name: sweep_1
  namespace: "alice smith"   #<
python:
  initialize: {build_file: build.py}
  jobs: [{name: j1, file: run.py}]
""", "meta.namespace"),
    ("bad_batch_name", """\
meta:
  batch_name: .hidden   #<
  namespace: alice
python:
  initialize: {build_file: build.py}
  jobs: [{name: j1, file: run.py}]
""", "meta.batch_name"),
    ("alias_with_slash", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs:
    - name: j1
      file: run.py
      required_files:
        - path: a.txt
          alias: sub/a.txt   #<
""", "python.jobs[0].required_files[0].alias"),
    ("alias_dotdot", GOOD_HEAD + """\
python:
  initialize:
    build_file: build.py
    required_files:
      - {path: a.txt, alias: ..}   #<
  jobs: [{name: j1, file: run.py}]
""", "python.initialize.required_files[0].alias"),
    ("empty_job_list", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs: []   #<
""", "python.jobs"),
    ("two_flavour_sections", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs: [{name: j1, file: run.py}]
shell:
  jobs: [{name: j2, command: "true"}]   #<
""", "shell"),
    ("no_flavour_section", "meta:   #<\n  batch_name: sweep_1\n  namespace: alice\n", None),
    ("missing_meta", "python:   #<\n  initialize: {build_file: build.py}\n  jobs: [{name: j1, file: run.py}]\n",
     None),
    ("capabilities_not_a_list", """\
meta:
  batch_name: sweep_1
  namespace: alice
  capabilities: python3 gpu   #<
shell:
  jobs: [{name: j1, command: "true"}]
""", "meta.capabilities"),
    ("capability_bad_name", """\
meta:
  batch_name: sweep_1
  namespace: alice
  capabilities:
    - python3
    - "g p u"   #<
shell:
  jobs: [{name: j1, command: "true"}]
""", "meta.capabilities[1]"),
    ("capability_is_a_mapping", """\
meta:
  batch_name: sweep_1
  namespace: alice
  capabilities: [{gpu: 1}]   #<
shell:
  jobs: [{name: j1, command: "true"}]
""", "meta.capabilities[0]"),
    ("same_file_twice_one_alias", GOOD_HEAD + """\
python:
  initialize:
    build_file: build.py
    required_files:
      - path: shared.txt
      - {path: other/shared.txt, alias: shared.txt}   #<
  jobs: [{name: j1, file: run.py}]
""", "python.initialize.required_files[1]"),
    ("same_name_twice_no_alias", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs:
    - name: j1
      file: run.py
      required_files:
        - shared.txt
        - other/shared.txt   #<
""", "python.jobs[0].required_files[1]"),
    ("job_file_shadows_initial_file", GOOD_HEAD + """\
python:
  initialize:
    build_file: build.py
    required_files: [shared.txt]
  jobs:
    - name: j1   #<
      file: run.py
      required_files: [other/shared.txt]
""", "python.jobs[0]"),
    ("yaml_duplicate_key", GOOD_HEAD + """\
python:
  initialize: {build_file: build.py}
  jobs:
    - name: j1
      file: run.py
      file: run.py   #<
""", "python.jobs[0].file"),
    ("shell_job_without_command", GOOD_HEAD + """\
shell:
  jobs:
    - name: j1   #<
""", "shell.jobs[0]"),
    ("bad_matrix_id", """\
meta:
  batch_name: sweep_1
  namespace: alice
  matrix: alice@example.org   #<
shell:
  jobs: [{name: j1, command: "true"}]
""", "meta.matrix"),
    ("slurm_unknown_key", GOOD_HEAD + """\
slurm:
  gpus: 2   #<
shell:
  jobs: [{name: j1, command: "true"}]
""", "slurm.gpus"),
    ("slurm_wrong_type", GOOD_HEAD + """\
shell:
  jobs:
    - name: j1
      command: "true"
      slurm:
        cpus_per_task: many   #<
""", "shell.jobs[0].slurm.cpus_per_task"),
    ("apptainer_relative_mount", GOOD_HEAD + """\
apptainer:
  initialize:
    sif: image.sif
    required_mounts: [scratch]   #<
  jobs: [{name: j1}]
""", "apptainer.initialize.required_mounts[0]"),
    ("apptainer_without_sif", GOOD_HEAD + """\
apptainer:
  initialize:
    required_files: [shared.txt]   #<
  jobs: [{name: j1}]
""", "apptainer.initialize"),
    ("params_not_a_mapping", GOOD_HEAD + """\
shell:
  jobs:
    - name: j1
      command: "true"
      params: [1, 2]   #<
""", "shell.jobs[0].params"),
    ("params_bad_binary", GOOD_HEAD + """\
shell:
  jobs:
    - name: j1
      command: "true"
      params: {blob: !!binary "not base64"}   #<
""", "shell.jobs[0].params"),
    ("path_with_nul_byte", GOOD_HEAD + """\
shell:
  initialize:
    required_files: ["a\\0b"]   #<
  jobs: [{name: j1, command: "true"}]
""", "shell.initialize.required_files[0]"),
    ("yaml_control_character", GOOD_HEAD + "shell:\n  jobs: [{name: j1, command: \"\x07\"}]\n", None),
]


def marked_line(text):
    for number, line in enumerate(text.splitlines(), 1):
        if "#<" in line:
            return number
    return None


def assert_one_line_error(result, file_name, line=None, key=None):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    message = lines[0]
    assert str(file_name) in message
    if line is not None:
        assert f"{file_name}:{line}:" in message
    if key is not None:
        assert key in message
    return message


@pytest.mark.parametrize("case_id,text,key", BAD_JOB_FILES, ids=[c[0] for c in BAD_JOB_FILES])
def test_check_refuses_bad_job_file(tmp_path, case_id, text, key):
    write_files(tmp_path, SUPPORT)
    (tmp_path / "other").mkdir(exist_ok=True)
    job_file = tmp_path / "distribute-jobs.yaml"
    job_file.write_text(text)
    result = cli("check", job_file, cwd=tmp_path)
    line = marked_line(text)
    assert_one_line_error(result, job_file, line, key)


def test_check_names_the_line_of_the_second_duplicate_and_the_first(tmp_path):
    write_files(tmp_path, SUPPORT)
    job_file = tmp_path / "jobs.yaml"
    job_file.write_text(GOOD_HEAD + "shell:\n  jobs:\n    - name: same\n      command: 'true'\n"
                        "    - name: other\n      command: 'true'\n    - name: same\n      command: 'true'\n")
    message = assert_one_line_error(cli("check", job_file), job_file, 11, "shell.jobs[2].name")
    assert "line 7" in message and "'same'" in message


def test_job_named_like_a_shell_command_is_refused_and_runs_nothing(tmp_path):
    pwned = tmp_path / "pwned"
    job_file = tmp_path / "distribute-jobs.yaml"
    job_file.write_text(GOOD_HEAD + f'shell:\n  jobs:\n    - name: "x; touch {pwned}"\n'
                        f'      command: "true"\n')
    for command in ("check", "run"):
        result = cli(command, job_file, "--save-dir", tmp_path / "out") if command == "run" \
            else cli(command, job_file)
        assert_one_line_error(result, job_file, 7, "shell.jobs[0].name")
        assert not pwned.exists()
    assert not (tmp_path / "out").exists()


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    job_file = tmp_path / "distribute-jobs.yaml"
    job_file.write_bytes(GOOD_HEAD.encode() + b"shell:\n  jobs:\n    - name: caf\xe9\n")
    message = assert_one_line_error(cli("check", job_file), job_file, 7)
    assert "UTF-8" in message


@pytest.mark.parametrize("content", ["", "\n\n   \n", "# only a comment\n# and another\n"])
def test_empty_file(tmp_path, content):
    job_file = tmp_path / "distribute-jobs.yaml"
    job_file.write_text(content)
    message = assert_one_line_error(cli("check", job_file), job_file)
    assert "empty" in message


def test_directory_given_as_file(tmp_path):
    folder = tmp_path / "distribute-jobs.yaml"
    folder.mkdir()
    message = assert_one_line_error(cli("check", folder), folder)
    assert "directory" in message


def test_missing_job_file_and_no_default(tmp_path):
    assert_one_line_error(cli("check", tmp_path / "nope.yaml"), tmp_path / "nope.yaml")
    result = cli("check", cwd=tmp_path)     # no argument, no distribute-jobs.yaml here
    assert_one_line_error(result, "distribute-jobs.yaml")


def test_check_accepts_a_good_file_and_lists_jobs(tmp_path):
    write_files(tmp_path, SUPPORT)
    job_file = tmp_path / "distribute-jobs.yaml"
    job_file.write_text(GOOD_HEAD + """\
python:
  initialize:
    build_file: build.py
    required_files: [shared.txt]
  jobs:
    - name: job_a
      file: run.py
      required_files: [{path: a.txt, alias: case.txt}]
    - name: job_b
      file: run.py
      required_files: [{path: b.txt, alias: case.txt}]
""")
    result = cli("check", cwd=tmp_path)     # finds distribute-jobs.yaml in the cwd
    assert result.returncode == 0, result.stderr
    assert "alice/sweep_1" in result.stdout and "python batch, 2 jobs" in result.stdout
    assert "job_a  [case.txt]" in result.stdout and "job_b  [case.txt]" in result.stdout


# --- what must load ------------------------------------------------------------------------

def test_loads_python_file_into_dataclasses(tmp_path):
    write_files(tmp_path, SUPPORT)
    job_file = tmp_path / "distribute-jobs.yaml"
    job_file.write_text("""\
meta:
  batch_name: sweep_004
  namespace: alice_openfoam
  capabilities: [python3, gpu]
  matrix: "@alice:matrix.org"
python:
  initialize:
    build_file: {path: build.py}
    required_files:
      - path: shared.txt
      - {path: a.txt, alias: params.json}
  jobs:
    - name: re_100
      file: {path: run.py}
      required_files: [{path: b.txt, alias: case.json}]
      retries: 2
      params: {re: 100, when: 2024-01-02}
    - name: re_200
      file: run.py
""")
    batch = load_job_file(str(job_file))
    assert batch.flavour == "python"
    assert batch.meta == distribute.Meta("sweep_004", "alice_openfoam", ["python3", "gpu"], "@alice:matrix.org")
    assert batch.build == distribute.FileSpec(str(tmp_path / "build.py"), "build.py")
    assert batch.initial_files == [distribute.FileSpec(str(tmp_path / "shared.txt"), "shared.txt"),
                                   distribute.FileSpec(str(tmp_path / "a.txt"), "params.json")]
    first, second = batch.jobs
    assert first.name == "re_100" and first.retries == 2
    assert first.file == distribute.FileSpec(str(tmp_path / "run.py"), "job.py")
    assert first.required_files == [distribute.FileSpec(str(tmp_path / "b.txt"), "case.json")]
    assert first.params == {"re": 100, "when": "2024-01-02"}   # must fit in job.json
    assert second.name == "re_200" and second.retries == 0 and second.required_files == []
    assert batch.slurm is None and first.slurm is None


def test_slurm_sections_and_nulls_are_accepted(tmp_path):
    write_files(tmp_path, SUPPORT)
    job_file = tmp_path / "distribute-jobs.yaml"
    all_null = "\n".join(f"        {key}: ~" for key in distribute.SLURM_KEYS)
    job_file.write_text(GOOD_HEAD + f"""\
slurm: ~
python:
  initialize:
    build_file: build.py
    required_files:
      - {{path: shared.txt, alias: ~}}
  jobs:
    - name: j1
      file: {{path: run.py, alias: ~}}
      slurm: {{time: ~, partition: gpu, cpus_per_task: 4, mem_per_cpu: 2G, mail_type: ~}}
    - name: j2
      file: run.py
      slurm: ~
    - name: j3
      file: run.py
      slurm:
{all_null}
""")
    batch = load_job_file(str(job_file))
    assert batch.slurm is None
    assert batch.initial_files[0].alias == "shared.txt"
    j1, j2, j3 = batch.jobs
    assert j1.slurm == distribute.SlurmOptions(partition="gpu", cpus_per_task=4, mem_per_cpu="2G")
    assert j2.slurm is None
    assert j3.slurm == distribute.SlurmOptions()

    job_file.write_text(GOOD_HEAD + """\
slurm:
  job_name: sweep
  nodes: 1
  ntasks: ~
  time: "01:00:00"
  account: ~
shell:
  jobs: [{name: j1, command: "true"}]
""")
    batch = load_job_file(str(job_file))
    assert batch.slurm == distribute.SlurmOptions(job_name="sweep", nodes=1, time="01:00:00")


def test_apptainer_sif_path_and_alias(tmp_path):
    write_files(tmp_path, SUPPORT)
    job_file = tmp_path / "distribute-jobs.yaml"
    job_file.write_text(GOOD_HEAD + """\
apptainer:
  initialize:
    sif: {path: image.sif, alias: solver.sif}
    required_files: [shared.txt]
    required_mounts: [/scratch, /data/out]
  jobs:
    - name: j1
      required_files: [{path: a.txt, alias: case.json}]
    - name: j2
""")
    batch = load_job_file(str(job_file))
    assert batch.flavour == "apptainer"
    assert batch.build == distribute.FileSpec(str(tmp_path / "image.sif"), "solver.sif")
    assert batch.mounts == ["/scratch", "/data/out"]
    assert [j.name for j in batch.jobs] == ["j1", "j2"] and batch.jobs[1].required_files == []
    job_file.write_text(GOOD_HEAD + "apptainer:\n  initialize: {sif: image.sif}\n  jobs: [{name: j1}]\n")
    assert load_job_file(str(job_file)).build.alias == "image.sif"


def test_shell_flavour(tmp_path):
    write_files(tmp_path, SUPPORT)
    job_file = tmp_path / "distribute-jobs.yaml"
    job_file.write_text(GOOD_HEAD + """\
shell:
  initialize:
    build: make -j4
  jobs:
    - {name: a, command: "echo a > distribute_save/a.txt"}
    - {name: b, command: "exit 3", retries: 1}
""")
    batch = load_job_file(str(job_file))
    assert batch.flavour == "shell" and batch.build is None and batch.build_command == "make -j4"
    assert [(j.name, j.command, j.retries) for j in batch.jobs] == [
        ("a", "echo a > distribute_save/a.txt", 0), ("b", "exit 3", 1)]


def copy_compat(flavour: str, dest: Path) -> Path:
    folder = dest / flavour
    shutil.copytree(COMPAT / flavour, folder)
    return folder


def test_compat_python_loads_unchanged(tmp_path):
    folder = copy_compat("python", tmp_path)
    write_files(folder, {"build.py": "print('build')\n", "run.py": "print('run')\n"})
    original = (folder / "distribute-jobs.yaml").read_bytes()
    assert original == (COMPAT / "python" / "distribute-jobs.yaml").read_bytes()
    batch = load_job_file(str(folder / "distribute-jobs.yaml"))
    assert (folder / "distribute-jobs.yaml").read_bytes() == original
    assert batch.flavour == "python"
    assert batch.meta == distribute.Meta("example_build_batch", "brooks-openfoam", ["python3"],
                                         "@karlik:matrix.org")
    assert batch.build == distribute.FileSpec(str(folder / "build.py"), "build.py")
    assert batch.initial_files == [distribute.FileSpec(str(folder / "dataset_always.csv"), "dataset_always.csv")]
    assert [j.name for j in batch.jobs] == ["job_1", "job_2"]
    job_1, job_2 = batch.jobs
    assert job_1.file == job_2.file == distribute.FileSpec(str(folder / "run.py"), "job.py")
    assert job_1.required_files == [distribute.FileSpec(str(folder / "dataset_sometimes.csv"), "dataset.csv")]
    assert job_2.required_files == []
    result = cli("check", folder / "distribute-jobs.yaml")
    assert result.returncode == 0, result.stderr
    assert "brooks-openfoam/example_build_batch" in result.stdout


def test_compat_apptainer_loads_unchanged(tmp_path):
    folder = copy_compat("apptainer", tmp_path)
    write_files(folder, {"build.sif": "not really an image\n"})
    batch = load_job_file(str(folder / "distribute-jobs.yaml"))
    assert batch.flavour == "apptainer"
    assert batch.meta == distribute.Meta("example_build_batch_apptainer", "brooks-openfoam", ["apptainer"],
                                         "@karlik:matrix.org")
    assert batch.build == distribute.FileSpec(str(folder / "build.sif"), "build.sif")
    assert batch.mounts == []
    assert [f.alias for f in batch.initial_files] == ["dataset_always.csv"]
    assert [j.name for j in batch.jobs] == ["job_1", "job_2"]
    assert batch.jobs[0].required_files == [
        distribute.FileSpec(str(folder / "dataset_sometimes.csv"), "dataset.csv")]
    assert batch.jobs[1].required_files == [] and batch.jobs[0].file is None
    assert cli("check", folder / "distribute-jobs.yaml").returncode == 0


def test_compat_python_batch_runs(tmp_path):
    """The compat python batch, with small stand-in scripts, through the real `run` command."""
    folder = copy_compat("python", tmp_path)
    write_files(folder, {
        "build.py": "open('built.txt', 'w').write('yes')\nprint('stand-in build')\n",
        "run.py": "import os, json\n"
                  "seen = {'input': sorted(os.listdir('input')), 'built': open('built.txt').read()}\n"
                  "json.dump(seen, open('distribute_save/seen.json', 'w'))\n"
                  "print('ran', os.environ['DISTRIBUTE_JOB'])\n"})
    save = tmp_path / "results"
    result = cli("run", folder / "distribute-jobs.yaml", "--save-dir", save)
    assert result.returncode == 0, result.stderr
    batch_dir = save / "brooks-openfoam" / "example_build_batch"
    assert sorted(p.name for p in batch_dir.iterdir()) == ["build", "job_1", "job_2"]
    builds = list((batch_dir / "build").iterdir())
    assert len(builds) == 1 and "stand-in build" in builds[0].read_text()
    import json
    for job, inputs in (("job_1", ["dataset.csv", "dataset_always.csv"]), ("job_2", ["dataset_always.csv"])):
        assert sorted(p.name for p in (batch_dir / job).iterdir()) == ["job.json", "seen.json", "stdout.txt"]
        assert json.loads((batch_dir / job / "seen.json").read_text()) == {"input": inputs, "built": "yes"}
        assert (batch_dir / job / "stdout.txt").read_text() == f"ran {job}\n"
        assert json.loads((batch_dir / job / "job.json").read_text())["state"] == "ok"


# --- templates -------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["python", "apptainer", "shell"])
def test_template_is_accepted_by_check_and_never_overwrites(tmp_path, flavour):
    out = tmp_path / "new_folder"       # does not exist yet: -o DIR puts the files inside
    result = cli("template", flavour, "-o", out)
    assert result.returncode == 0, result.stderr
    job_file = out / "distribute-jobs.yaml"
    assert job_file.is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted(distribute.TEMPLATES[flavour])
    checked = cli("check", job_file)
    assert checked.returncode == 0, checked.stderr
    assert f"{flavour} batch" in checked.stdout
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = cli("template", flavour, "-o", out)
    assert_one_line_error(again, "already exists")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # and into an existing folder, and to an explicit file name
    other = tmp_path / "existing"
    other.mkdir()
    assert cli("template", flavour, "-o", other).returncode == 0
    assert cli("check", other / "distribute-jobs.yaml").returncode == 0
    named = tmp_path / "third" / "sweep.yaml"
    assert cli("template", flavour, "-o", named).returncode == 0
    assert cli("check", named).returncode == 0


@pytest.mark.parametrize("flavour", ["python", "shell"])
def test_template_runs_as_written(tmp_path, flavour):
    out = tmp_path / "t"
    assert cli("template", flavour, "-o", out).returncode == 0
    result = cli("run", "--save-dir", tmp_path / "res", cwd=out)
    assert result.returncode == 0, result.stderr
    batch = load_job_file(str(out / "distribute-jobs.yaml"))
    for job in batch.jobs:
        folder = tmp_path / "res" / batch.meta.namespace / batch.meta.batch_name / job.name
        assert (folder / "job.json").is_file() and (folder / "stdout.txt").is_file()


# --- nodes files ------------------------------------------------------------------------------

def test_nodes_file_loads(tmp_path):
    nodes_file = tmp_path / "distribute-nodes.yaml"
    nodes_file.write_text("""\
nodes:
  - name: lab3
    host: lab3.example.edu
    user: distribute
    port: 2222
    capabilities: [openfoam, fftw]
    slots: 2
    workdir: /scratch/distribute
  - name: lab4
    host: lab4
    port: ~
    user: ~
  - name: here
    host: local
""")
    lab3, lab4, here = load_nodes_file(str(nodes_file))
    assert lab3 == distribute.NodeSpec("lab3", "lab3.example.edu", "distribute", 2222, ["openfoam", "fftw"], 2,
                                       "/scratch/distribute")
    assert lab4 == distribute.NodeSpec("lab4", "lab4")
    assert lab4.slots == 1 and lab4.workdir == distribute.DEFAULT_NODE_WORKDIR and not lab4.is_local
    assert here.is_local


NODE = "  - name: lab1\n    host: lab1.example.edu\n"
BAD_NODES_FILES = [
    ("unknown_key", "nodes:\n" + NODE + "    colour: red   #<\n", "nodes[0].colour"),
    ("unknown_top_key", "nodes:\n" + NODE + "extra: 1   #<\n", "extra"),
    ("port_too_big", "nodes:\n" + NODE + "    port: 70000   #<\n", "nodes[0].port"),
    ("port_zero", "nodes:\n" + NODE + "    port: 0   #<\n", "nodes[0].port"),
    ("port_text", "nodes:\n" + NODE + "    port: ssh   #<\n", "nodes[0].port"),
    ("duplicate_name", "nodes:\n" + NODE + "  - name: lab1   #<\n    host: other\n", "nodes[1].name"),
    ("host_option_injection", "nodes:\n  - name: lab1\n    host: -oProxyCommand=x   #<\n", "nodes[0].host"),
    ("host_shell_text", "nodes:\n  - name: lab1\n    host: 'lab1; rm -rf /'   #<\n", "nodes[0].host"),
    ("user_option_injection", "nodes:\n" + NODE + "    user: -oFoo   #<\n", "nodes[0].user"),
    ("bad_node_name", "nodes:\n  - name: ../lab   #<\n    host: lab\n", "nodes[0].name"),
    ("missing_host", "nodes:\n  - name: lab1   #<\n", "nodes[0]"),
    ("slots_zero", "nodes:\n" + NODE + "    slots: 0   #<\n", "nodes[0].slots"),
    ("relative_workdir", "nodes:\n" + NODE + "    workdir: tmp/d   #<\n", "nodes[0].workdir"),
    ("bad_capability", "nodes:\n" + NODE + "    capabilities: [gpu, 'a b']   #<\n", "nodes[0].capabilities[1]"),
    ("empty_list", "nodes: []   #<\n", None),
    ("not_a_list", "nodes:\n  lab1: {host: x}   #<\n", "nodes"),
    ("yaml_syntax", "nodes:\n  - name: lab1\n    host: [x   #<\n", None),
]


@pytest.mark.parametrize("case_id,text,key", BAD_NODES_FILES, ids=[c[0] for c in BAD_NODES_FILES])
def test_bad_nodes_file(tmp_path, case_id, text, key):
    nodes_file = tmp_path / "distribute-nodes.yaml"
    nodes_file.write_text(text)
    with pytest.raises(UserError) as info:
        load_nodes_file(str(nodes_file))
    message = str(info.value)
    assert "\n" not in message
    line = marked_line(text)
    if case_id == "yaml_syntax":
        line = 4    # the parser notices the unclosed '[' at the end of the file
    assert message.startswith(f"{nodes_file}:{line}:")
    if key is not None:
        assert f" {key}: " in message


# --- resources, dependencies and node capacity (SPEC §3, §4) -------------------

def resource_batch(tmp_path, meta_extra="", job_extra=""):
    path = tmp_path / "distribute-jobs.yaml"
    path.write_text(f"meta:\n  batch_name: b\n  namespace: ns\n{meta_extra}"
                    f"shell:\n  jobs:\n    - name: a\n      command: 'true'\n{job_extra}"
                    "    - name: b\n      command: 'true'\n")
    return path


def test_resources_default_in_meta_and_override_per_job(tmp_path):
    batch = load_job_file(str(resource_batch(
        tmp_path, "  resources: {cpus: 4, memory: 16G, time: 2h}\n  after: [sweep, other/prep]\n",
        "      resources: {memory: 512M, gpus: 2}\n")))
    a, b = batch.jobs
    assert a.resources == distribute.Resources(cpus=4, memory=512 << 20, gpus=2, time=7200)
    assert b.resources == distribute.Resources(cpus=4, memory=16 << 30, time=7200)
    assert batch.meta.after == ["ns/sweep", "other/prep"] and batch.meta.after_failed == "wait"
    plan = distribute.JobPlan.of(a)
    assert (plan.cpus, plan.memory, plan.gpus, plan.time) == (4, 512 << 20, 2, 7200)
    # a job that asks only for time still holds one cpu; a job without resources holds a slot
    only_time = load_job_file(str(resource_batch(tmp_path, job_extra="      resources: {time: 10m}\n"))).jobs
    assert distribute.JobPlan.of(only_time[0]).cpus == 1 and distribute.JobPlan.of(only_time[1]).cpus == 0


@pytest.mark.parametrize("meta_extra, job_extra, message", [
    ("  resources: {cpus: 0}\n", "", ":4: meta.resources.cpus: must be at least 1"),
    ("  resources: {memory: lots}\n", "", ":4: meta.resources.memory: size 'lots' is not like 16G, 512M or 1.5T"),
    ("  resources: {memory: 0G}\n", "", ":4: meta.resources.memory: must be more than zero"),
    ("  resources: {time: 2 days}\n", "", ":4: meta.resources.time: duration '2 days' is not like 4h"),
    ("  resources: {disks: 2}\n", "", ":4: meta.resources.disks: unknown key"),
    ("", "      resources: {gpus: -1}\n", ":8: shell.jobs[0].resources.gpus: must be at least 0"),
    ("", "      resources: [4]\n", ":8: shell.jobs[0].resources: expected a mapping"),
    ("  after: [a/b/c]\n", "", ":4: meta.after[0]: 'a/b/c' is not a batch"),
    ("  after: [b]\n", "", ":4: meta.after: a batch cannot wait for itself"),
    ("  after_failed: maybe\n", "", ":4: meta.after_failed: 'maybe' is not 'wait' or 'start'"),
])
def test_bad_resources_and_after_name_file_line_and_key(tmp_path, meta_extra, job_extra, message):
    with pytest.raises(UserError) as caught:
        load_job_file(str(resource_batch(tmp_path, meta_extra, job_extra)))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_nodes_file_capacity_overrides_and_reserve(tmp_path):
    nodes_file = tmp_path / "distribute-nodes.yaml"
    nodes_file.write_text("nodes:\n  - name: lab1\n    host: lab1\n    cpus: 32\n    memory: 128G\n    gpus: 2\n"
                          "    reserve: {cpus: 4, memory: 16G, gpus: 1}\n  - {name: lab2, host: lab2, slots: 3}\n")
    lab1, lab2 = load_nodes_file(str(nodes_file))
    assert (lab1.cpus, lab1.memory, lab1.gpus) == (32, 128 << 30, 2) and not lab1.slots_given
    assert lab1.reserve == distribute.Resources(cpus=4, memory=16 << 30, gpus=1)
    assert lab2.slots == 3 and lab2.slots_given and lab2.cpus is None
    nodes_file.write_text("nodes:\n  - name: lab1\n    host: lab1\n    reserve: {time: 1h}\n")
    with pytest.raises(UserError, match=r":4: nodes\[0\]\.reserve: time: a node reserves cpus, memory and gpus only"):
        load_nodes_file(str(nodes_file))

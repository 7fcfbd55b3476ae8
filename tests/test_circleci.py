"""The CircleCI configuration and the image it builds, checked without CircleCI or Docker.

The schema is CircleCI's published one as vendored by check-jsonschema
(``--builtin-schema vendor.circle-ci``), so the check runs offline.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, SAMPLE

ruamel_yaml = pytest.importorskip("ruamel.yaml", reason="needs the test extra (check-jsonschema)")
pytest.importorskip("check_jsonschema", reason="needs the test extra (check-jsonschema)")

CIRCLECI = REPO / ".circleci"
CONFIG = CIRCLECI / "config.yml"
EXPECTED = CIRCLECI / "expected_outputs.txt"
LIST_OUTPUTS = CIRCLECI / "list_outputs.sh"
JOBS = {"build", "test", "sample", "docs", "deploy"}


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.circle-ci",
         str(path)], capture_output=True, text=True, check=False)


def _load(path: Path = CONFIG) -> dict:
    return ruamel_yaml.YAML(typ="safe", pure=True).load(path.read_text())


def _commands(job: dict) -> str:
    """Every shell command of a job's run steps, joined."""
    out = []
    for step in job["steps"]:
        if isinstance(step, dict) and "run" in step:
            run = step["run"]
            out.append(run if isinstance(run, str) else run["command"])
    return "\n".join(out)


@pytest.fixture(scope="module")
def config() -> dict:
    return _load()


def test_config_is_valid_against_circleci_schema():
    result = _validate(CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_catches_a_mistake(tmp_path):
    # a misspelt job key must fail: the check above is not vacuous
    config = _load()
    config["jobs"]["build"]["stepz"] = config["jobs"]["build"].pop("steps")
    broken = tmp_path / "config.yml"
    broken.write_text(json.dumps(config))  # JSON is YAML
    result = _validate(broken)
    assert result.returncode != 0
    assert "jobs.build" in result.stdout


def test_jobs_and_workflow(config):
    assert config["version"] == 2.1
    assert set(config["jobs"]) == JOBS
    (workflow,) = config["workflows"].values()
    entries = {}
    for entry in workflow["jobs"]:
        name, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
        entries[name] = options or {}
    assert set(entries) == JOBS
    assert set(entries["test"]["requires"]) == {"build"}
    assert set(entries["sample"]["requires"]) == {"build"}
    assert set(entries["deploy"]["requires"]) == {"test", "sample", "docs"}
    # a tag pipeline runs a job only when the job (and each job it requires) accepts tags
    tags = entries["deploy"]["filters"]["tags"]["only"]
    release = re.compile(tags.strip("/"))
    assert release.fullmatch("v1.2.3") and release.fullmatch("1.2.3")
    assert not release.fullmatch("main")
    for options in entries.values():
        assert options["filters"]["tags"]["only"] == tags
    # deploy runs on tags only, with credentials from a context
    assert entries["deploy"]["filters"]["branches"]["ignore"] == "/.*/"
    assert entries["deploy"]["context"]


def test_build_test_and_deploy_jobs(config):
    jobs = config["jobs"]
    build = _commands(jobs["build"])
    assert "docker build" in build and "docker save" in build
    test = _commands(jobs["test"])
    assert ".circleci/test_in_image.sh" in test
    assert (CIRCLECI / "test_in_image.sh").is_file()
    deploy = _commands(jobs["deploy"])
    assert "docker push" in deploy
    assert "--password-stdin" in deploy and "--password " not in deploy
    docs = _commands(jobs["docs"])
    assert "mkdocs build --strict" in docs


def test_sample_job_compares_with_the_committed_list(config):
    sample = _commands(config["jobs"]["sample"])
    assert "--read-only" in sample and "--network none" in sample  # no run-time downloads
    assert sample.index(" participant ") < sample.index("run group")
    assert ".circleci/list_outputs.sh" in sample
    assert "diff -u .circleci/expected_outputs.txt" in sample


def test_expected_outputs_cover_the_shipped_sample():
    lines = EXPECTED.read_text().splitlines()
    assert lines == sorted(lines, key=lambda s: s.encode())  # LC_ALL=C order
    for top in ("dataset_description.json", "group_brainage.tsv", "group_brainage.json",
                "group_brainage.html", "logs/summary-<run>.json"):
        assert top in lines
    subjects = sorted(p.name for p in SAMPLE.glob("sub-*") if p.is_dir())
    assert len(subjects) == 4
    assert {"logs/CITATION.md", "logs/CITATION.bib"} <= set(lines)
    # every derivative that the participant level's sinks write, from their own tables
    from brainage_bids.derivatives import derivative_path
    from brainage_bids.workflows.outputs import (
        ATTENTION_OUTPUTS,
        GRADCAM_OUTPUTS,
        PREDICT_OUTPUTS,
        PREPROC_OUTPUTS,
    )

    sinks = PREPROC_OUTPUTS + PREDICT_OUTPUTS + GRADCAM_OUTPUTS + ATTENTION_OUTPUTS
    for sub in subjects:
        assert f"{sub}.html" in lines
        for _, _, suffix, entities in sinks:
            extension = {"xfm": ".mat", "brainage": ".json"}.get(suffix, ".nii.gz")
            path = derivative_path(Path("."), {"subject": sub.removeprefix("sub-")},
                                   suffix=suffix, extension=extension, **entities)
            assert str(path) in lines, path
    # nothing run-specific left in: a rerun must produce the same list
    assert not [line for line in lines if re.search(r"[0-9a-f]{12}", line)]


def test_list_outputs_normalises_run_ids(tmp_path):
    for name in ("logs/brainage-0123456789ab.log", "logs/brainage-ba9876543210.log",
                 "logs/config-0123456789ab.toml", "sub-01/anat/sub-01_brainage.json",
                 "group_brainage.tsv", "Z.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    result = subprocess.run(["bash", str(LIST_OUTPUTS), str(tmp_path)], capture_output=True,
                            text=True, check=True)
    assert result.stdout.splitlines() == [
        "Z.txt", "group_brainage.tsv", "logs/brainage-<run>.log", "logs/brainage-<run>.log",
        "logs/config-<run>.toml", "sub-01/anat/sub-01_brainage.json"]


# --- the image CI builds ------------------------------------------------------------------


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_dockerfile_base_and_fsl_are_build_arguments():
    text = _dockerfile()
    first = [line for line in text.splitlines() if line and not line.startswith("#")][:2]
    assert first[0].startswith("ARG BASE_IMAGE=")
    assert first[1] == "FROM ${BASE_IMAGE}"
    assert re.search(r"^ARG INSTALL_FSL=1$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu$", text, re.M)


def test_dockerfile_runtime_contract():
    text = _dockerfile()
    assert 'ENTRYPOINT ["brainage-bids"]' in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in {"root", "0"}
    assert "org.opencontainers.image.version" in text
    for variable in ("OMP_NUM_THREADS", "NIPYPE_NO_ET", "MPLCONFIGDIR=/tmp/"):
        assert variable in text
    # nothing fetched by ADD, and the build context is the package only
    assert not re.search(r"^ADD\s+https?://", text, re.M)
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:].count("!brainage_bids") == 1

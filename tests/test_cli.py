"""The BIDS-App command line: options, validators, one-line errors and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from brainage_bids import __version__
from brainage_bids.cli.parser import UsageError, build_parser, parse_settings
from brainage_bids.cli.run import main
from brainage_bids.config import write_settings


def test_settings_are_frozen_and_resolved(sample_bids, tmp_path):
    settings = parse_settings([str(sample_bids), str(tmp_path / "out"), "participant",
                               "--participant-label", "sub-IXI012", "IXI013", "IXI012",
                               "--nprocs", "3"])
    assert settings.participant_label == ("IXI012", "IXI013")  # prefix stripped, deduplicated
    assert settings.bids_dir.is_absolute() and settings.output_dir.is_absolute()
    assert settings.nprocs == 3 and settings.omp_nthreads is None  # decided per run
    with pytest.raises(AttributeError):
        settings.nprocs = 4  # type: ignore[misc]


def test_threads_per_image_by_default_and_as_given(sample_bids, tmp_path):
    from brainage_bids.config import with_threads

    def threads(*extra, n_images):
        settings = parse_settings([str(sample_bids), str(tmp_path / "out"), "participant",
                                   *extra])
        return with_threads(settings, n_images).omp_nthreads

    assert threads("--nprocs", "16", n_images=1) == 8  # one image: the cores go to the model
    assert threads("--nprocs", "16", n_images=4) == 4
    assert threads("--nprocs", "32", n_images=500) == 1  # a cohort: 32 images at once
    assert threads("--nprocs", "2", n_images=4) == 1
    assert threads("--nprocs", "16", "--omp-nthreads", "3", n_images=500) == 3


def test_settings_written_for_provenance(sample_bids, tmp_path):
    settings = parse_settings([str(sample_bids), str(tmp_path / "out"), "train", "--seed", "7"])
    text = write_settings(settings).read_text()
    assert "seed = 7" in text and 'analysis_level = "train"' in text
    written = sorted((tmp_path / "out" / "logs").glob("config-*.toml"))
    assert [p.name for p in written] == [f"config-{settings.run_uuid}.toml"]


@pytest.mark.parametrize("option", ["--participant-label", "--session-label", "--bids-filter-file",
                                    "--work-dir", "--nprocs", "--omp-nthreads", "--mem-gb",
                                    "--skip-bids-validation", "--preproc", "--model", "--device",
                                    "--seed", "--version", "--epochs", "--attention",
                                    "--bias-reference", "--resume"])
def test_help_lists_bids_app_options(option):
    assert option in build_parser().format_help()


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def _one_error_line(capsys) -> str:
    """The error is one line (log lines may precede it), never a traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err), err
    errors = [line for line in err if line.startswith("brainage-bids: error:")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


def test_output_inside_bids_dir_is_a_usage_error(sample_bids, capsys):
    assert main([str(sample_bids), str(sample_bids / "derivatives"), "participant"]) == 2
    assert "inside the BIDS directory" in _one_error_line(capsys)
    assert not (sample_bids / "derivatives").exists()


def test_missing_bids_dir(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == 2
    assert "does not exist" in _one_error_line(capsys)


def test_dataset_without_description(tmp_path, capsys):
    (tmp_path / "bids").mkdir()
    assert main([str(tmp_path / "bids"), str(tmp_path / "out"), "participant"]) == 2
    assert "dataset_description.json" in _one_error_line(capsys)
    settings = parse_settings([str(tmp_path / "bids"), str(tmp_path / "out"), "participant",
                               "--skip-bids-validation"])
    assert settings.skip_bids_validation


def test_bad_label_and_bad_number_are_argparse_errors(sample_bids, tmp_path, capsys):
    for argv in (["--participant-label", "sub-"], ["--nprocs", "0"], ["--lr", "fast"]):
        with pytest.raises(SystemExit) as exc:
            main([str(sample_bids), str(tmp_path / "out"), "participant", *argv])
        assert exc.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_bids_filter_file_must_be_json(sample_bids, tmp_path):
    bad = tmp_path / "filter.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        parse_settings([str(sample_bids), str(tmp_path / "out"), "participant",
                        "--bids-filter-file", str(bad)])
    good = tmp_path / "good.json"
    good.write_text('{"t1w": {"acquisition": "mprage"}}')
    settings = parse_settings([str(sample_bids), str(tmp_path / "out"), "participant",
                               "--bids-filter-file", str(good)])
    assert settings.bids_filters == {"t1w": {"acquisition": "mprage"}}
    for text, message in (('{"T1w": {"acquisition": "mprage"}}', "has no \"t1w\" query"),
                          ('{"t1w": {"acquisiton": "mprage"}}',
                           "'acquisiton' is not a BIDS entity \\(did you mean 'acquisition'")):
        bad.write_text(text)
        with pytest.raises(UsageError, match=message):
            parse_settings([str(sample_bids), str(tmp_path / "out"), "participant",
                            "--bids-filter-file", str(bad)])
    bad.write_text('{"t1w": {"return_type": "id"}}')
    with pytest.raises(UsageError, match="'return_type' cannot be set there"):
        parse_settings([str(sample_bids), str(tmp_path / "out"), "participant",
                        "--bids-filter-file", str(bad)])
    good.write_text('{"t1w": {"regex_search": true, "subject": "IXI01.*", '
                    '"RepetitionTime": 2.3}}')  # get()'s own options, sidecar metadata
    parse_settings([str(sample_bids), str(tmp_path / "out"), "participant",
                    "--bids-filter-file", str(good)])
    good.write_text('{"t1w": {"desc": null, "run": 1}, "bold": {"task": "rest"}}')
    parse_settings([str(sample_bids), str(tmp_path / "out"), "participant",
                    "--bids-filter-file", str(good)])  # fMRIPrep's other queries are ignored


def test_unknown_participant_is_one_line_runtime_error(sample_bids, tmp_path, capsys):
    code = main([str(sample_bids), str(tmp_path / "out"), "participant",
                 "--participant-label", "NOPE", "-w", str(tmp_path / "work")])
    assert code == 1
    line = _one_error_line(capsys)
    assert "sub-NOPE" in line and "(it has sub-IXI012, sub-IXI013" in line
    (log,) = (tmp_path / "out" / "logs").glob("brainage-*.log")
    assert line in log.read_text()  # the log that users report with has the error too


def test_an_os_error_is_one_line_that_does_not_guess_read_or_write():
    import errno

    from brainage_bids.cli.run import one_line
    from brainage_bids.io import write_error

    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/w.safetensors")
    assert one_line(missing) == "no such file or directory: /x/w.safetensors"
    full = write_error(OSError(errno.ENOSPC, "No space left on device"), "/o/r.json")
    assert one_line(full) == "no space left on device writing /o/r.json"


def test_settings_are_written_atomically_or_named(sample_bids, tmp_path, monkeypatch):
    import errno

    from brainage_bids.io import OutputError

    settings = parse_settings([str(sample_bids), str(tmp_path / "out"), "group"])
    target = write_settings(settings)
    assert target.read_text().startswith("# brainage-bids run settings")
    original = Path.write_text

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OutputError, match=r"no space left on device writing .*config-"):
        write_settings(settings)
    monkeypatch.setattr(Path, "write_text", original)
    assert [p.name for p in settings.logs_dir.iterdir()] == [target.name]  # no temp file


def test_a_bad_model_name_is_a_usage_error_before_any_work(sample_bids, tmp_path):
    with pytest.raises(UsageError, match="--model-name must be a non-empty file stem"):
        parse_settings([str(sample_bids), str(tmp_path / "out"), "train",
                        "--model-name", "my model/v1"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("level", ["participant", "train"])
def test_device_cuda_without_a_gpu_fails_before_any_work(sample_bids, tmp_path, capsys, level):
    work = tmp_path / "work"
    code = main([str(sample_bids), str(tmp_path / "out"), level, "--device", "cuda",
                 "-w", str(work)])
    assert code == 1
    assert "no CUDA GPU is visible" in _one_error_line(capsys)
    assert not work.exists()  # nothing was preprocessed


def test_a_malformed_bias_reference_is_a_usage_error(sample_bids, tmp_path):
    with pytest.raises(UsageError, match=r"--bias-reference 'sex' is not of the form "
                                         r"COLUMN=VALUE"):
        parse_settings([str(sample_bids), str(tmp_path / "out"), "group",
                        "--bias-reference", "sex"])


def test_console_script_and_module_entry_point(sample_bids):
    proc = subprocess.run([sys.executable, "-m", "brainage_bids", "--help"],
                          capture_output=True, text=True, check=True)
    assert "participant" in proc.stdout and "--participant-label" in proc.stdout
    script = Path(sys.executable).with_name("brainage-bids")
    if script.exists():
        out = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                             check=True)
        assert __version__ in out.stdout


def test_atomic_writes_respect_the_umask(tmp_path):
    import os

    from brainage_bids.io import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a" / "x.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}"
    assert (path.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary left behind


def test_train_without_ages_fails_before_any_work(tiny_bids, tmp_path, capsys):
    (tiny_bids / "participants.tsv").write_text("participant_id\tsex\nsub-IXI012\tM\n")
    (tiny_bids / "sub-IXI012" / "sub-IXI012_sessions.tsv").unlink()
    out = tmp_path / "out"
    assert main([str(tiny_bids), str(out), "train", "-w", str(tmp_path / "work")]) == 1
    assert "needs an 'age' column" in _one_error_line(capsys)
    assert not (out / "models").exists() and not (tmp_path / "work").exists()


def test_train_with_too_few_ages_fails_before_any_work(tiny_bids, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(tiny_bids), str(out), "train", "-w", str(tmp_path / "work")]) == 1
    assert "training needs at least 6" in _one_error_line(capsys)
    assert not (out / "models").exists()


def test_train_with_non_numeric_age(tiny_bids, tmp_path, capsys):
    (tiny_bids / "participants.tsv").write_text("participant_id\tage\nsub-IXI013\told\n")
    assert main([str(tiny_bids), str(tmp_path / "out"), "train"]) == 1
    line = _one_error_line(capsys)
    assert line.startswith("brainage-bids: error: sub-IXI013: ") and "line 2" in line
    assert "'old' is not a number" in line and "--participant-label" in line
    # a participant that is not selected does not stop the others (here: too few ages)
    assert main([str(tiny_bids), str(tmp_path / "out"), "train",
                 "--participant-label", "IXI012"]) == 1
    assert "training needs at least" in _one_error_line(capsys)


def test_work_dir_default_and_container_variable(sample_bids, tmp_path, monkeypatch):
    args = [str(sample_bids), str(tmp_path / "out"), "participant"]
    monkeypatch.delenv("BRAINAGE_WORK_DIR", raising=False)
    assert parse_settings(args).work_dir == tmp_path / "out_work"
    monkeypatch.setenv("BRAINAGE_WORK_DIR", str(tmp_path / "scratch"))
    assert parse_settings(args).work_dir == tmp_path / "scratch"
    assert parse_settings([*args, "-w", str(tmp_path / "w")]).work_dir == tmp_path / "w"


def test_dropout_option_is_a_probability(sample_bids, tmp_path, capsys):
    args = [str(sample_bids), str(tmp_path / "out"), "train"]
    assert parse_settings([*args, "--dropout", "0.2"]).dropout == 0.2
    with pytest.raises(SystemExit) as exc:
        parse_settings([*args, "--dropout", "1.5"])
    assert exc.value.code == 2 and "probability" in capsys.readouterr().err


def test_a_malformed_input_reference_fails_before_any_work(tiny_bids, tmp_path, capsys,
                                                           untrained_model):
    import json
    import shutil

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(untrained_model, model)
    card = untrained_model.with_suffix(".json")
    data = json.loads(card.read_text())
    data["input_reference"] = {"levels": [0.5], "quantiles": [0.0, 1.0], "threshold": 0.1}
    (model / card.name).write_text(json.dumps(data))
    out = tmp_path / "out"
    assert main([str(tiny_bids), str(out), "participant", "-w", str(tmp_path / "work"),
                 "--model", str(model)]) == 1
    assert "input_reference is malformed" in _one_error_line(capsys)
    assert not (tmp_path / "work").exists()

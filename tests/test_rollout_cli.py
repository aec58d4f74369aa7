"""`dataflow rollout` through typer's CliRunner: the one-line refusals."""

from typer.testing import CliRunner

from dataflow.cli import app

runner = CliRunner()


def rollout(db, *args):
    return runner.invoke(app, ["rollout", "--db", str(db), "--no-progress", "--store", "files",
                               "--store-dir", str(db.parent / "features"), *args])


def error_line(result):
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


def test_a_missing_model_path_is_one_line(tmp_path):
    result = rollout(tmp_path / "r.sqlite", "--target-model", str(tmp_path / "x"))
    assert "no such file or directory" in error_line(result)


def test_a_missing_dataset_is_one_line(tmp_path, tiny_target):
    result = rollout(tmp_path / "r.sqlite", "--target-model", str(tiny_target), "--dataset", str(tmp_path / "d.jsonl"))
    assert "no such file; pass --dataset" in error_line(result)


def test_a_model_without_chat_template_and_no_option_is_one_line(tmp_path, tiny_target):
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_target, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    result = rollout(tmp_path / "r.sqlite", "--target-model", str(model))
    assert "has no chat template; pass --chat-template" in error_line(result)


def test_a_db_created_for_a_different_target_is_one_line(tmp_path, tiny_target):
    import shutil

    db = tmp_path / "r.sqlite"
    assert rollout(db, "--target-model", str(tiny_target), "--num-samples", "2").exit_code == 0
    other = tmp_path / "other-target"
    shutil.copytree(tiny_target, other)
    line = error_line(rollout(db, "--target-model", str(other), "--num-samples", "2"))
    assert "--target-model" in line and "start a new run with another --db" in line


def test_bad_options_are_one_line(tmp_path, tiny_target):
    line = error_line(rollout(tmp_path / "r.sqlite", "--target-model", str(tiny_target), "--epochs", "0"))
    assert "epochs must be >= 1" in line


def test_a_draft_vocab_larger_than_the_target_vocab_is_one_line(tmp_path, tiny_target):
    result = rollout(tmp_path / "r.sqlite", "--target-model", str(tiny_target), "--draft-vocab-size", "10000000")
    line = error_line(result)
    assert "--draft-vocab-size 10000000: larger than the target vocabulary" in line


def test_copies_without_sampling_are_one_line(tmp_path, tiny_target):
    result = rollout(tmp_path / "r.sqlite", "--target-model", str(tiny_target), "--regenerate",
                     "--samples-per-prompt", "2")
    assert "samples_per_prompt > 1 needs regenerate and temperature > 0" in error_line(result)


def test_more_eval_prompts_than_held_out_rows_is_one_line(tmp_path):
    result = runner.invoke(app, ["eval", "--draft", str(tmp_path), "--num-prompts", "9", "--held-out", "8"])
    assert "num_prompts 9 > held_out 8" in error_line(result)


def test_a_files_store_without_its_directory_is_refused_before_anything_runs(tmp_path):
    db = tmp_path / "r.sqlite"
    result = runner.invoke(app, ["rollout", "--db", str(db), "--no-progress", "--store", "files",
                                 "--target-model", str(tmp_path / "not-even-looked-at")])
    assert "--store files needs --store-dir" in error_line(result)
    assert not db.exists()  # refused from the options alone: no run was started


def test_eval_on_a_run_that_does_not_exist_is_one_line(tmp_path):
    result = runner.invoke(app, ["eval", "--draft", str(tmp_path), "--run", str(tmp_path / "nope.sqlite")])
    assert "nope.sqlite: no such run database" in error_line(result)
    assert not (tmp_path / "nope.sqlite").exists()

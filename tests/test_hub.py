"""launch/export.py --push_to_hub: a pretraining run published as the BabyLM evaluation reads it (final/ on main,
every word milestone chck_{N}M on a branch of that name), with huggingface_hub's HfApi replaced by a recorder (no
network here), and the one-line errors offline, unauthenticated and without a run to push."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))

import export  # noqa: E402


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records every call, in order."""

    calls: list = []
    fail_with: Exception | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False):
        if RecordingApi.fail_with is not None:
            raise RecordingApi.fail_with
        RecordingApi.calls.append(("create_repo", repo_id, private, exist_ok))

    def create_branch(self, repo_id, branch, exist_ok=False):
        RecordingApi.calls.append(("create_branch", repo_id, branch, exist_ok))

    def upload_folder(self, repo_id, folder_path, revision, commit_message):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        RecordingApi.calls.append(("upload_folder", repo_id, Path(folder_path).name, revision, files))
        return type("CommitInfo", (), {"commit_url": f"https://hub/{repo_id}/commit/{revision}"})()


@pytest.fixture
def recorder(monkeypatch):
    import huggingface_hub

    RecordingApi.calls, RecordingApi.fail_with = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


def _model_dir(path: Path, tag: str) -> Path:
    path.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (path / name).write_text(f"{tag} {name}")
    return path


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    _model_dir(run / "final", "final")
    for name in ("chck_10M", "chck_1M", "chck_2M"):
        _model_dir(run / "checkpoints" / name, name)
    (run / "checkpoints" / "step_00000100").mkdir()  # training state: not published
    (run / "checkpoints" / ".tmp-chck_3M").mkdir()  # a milestone being written: not published
    return run


def test_push_publishes_final_on_main_and_every_milestone_on_its_branch(recorder, run_dir, capsys):
    assert export.cli(["--run_dir", str(run_dir), "--push_to_hub", "me/ltgbert-10m", "--hub_private"]) == 0
    calls = recorder.calls
    assert calls[0] == ("create_repo", "me/ltgbert-10m", True, True)
    # Every branch exists before anything is uploaded, so each revision holds only its own model directory.
    branches = [c[2] for c in calls if c[0] == "create_branch"]
    assert branches == ["chck_1M", "chck_2M", "chck_10M"]
    assert max(i for i, c in enumerate(calls) if c[0] == "create_branch") < min(
        i for i, c in enumerate(calls) if c[0] == "upload_folder"
    )
    uploads = {c[3]: (c[2], c[4]) for c in calls if c[0] == "upload_folder"}
    assert uploads == {
        "main": ("final", ["config.json", "model.safetensors", "tokenizer.json"]),
        **{b: (b, ["config.json", "model.safetensors", "tokenizer.json"]) for b in branches},
    }
    assert "pushed chck_10M: https://hub/me/ltgbert-10m/commit/chck_10M" in capsys.readouterr().out


def test_push_errors_are_one_line(recorder, run_dir, tmp_path, capsys):
    from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

    def error(argv):
        assert export.cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        return err

    argv = ["--run_dir", str(run_dir), "--push_to_hub", "me/m"]
    recorder.fail_with = OfflineModeIsEnabled("offline")
    assert "while offline" in error(argv)
    recorder.fail_with = LocalTokenNotFoundError("no token")
    assert "not logged in" in error(argv)
    recorder.fail_with = ConnectionRefusedError("no route")
    assert "cannot reach the Hugging Face Hub" in error(argv)
    recorder.fail_with = None
    (tmp_path / "empty").mkdir()
    assert "holds no final/" in error(["--run_dir", str(tmp_path / "empty"), "--push_to_hub", "me/m"])
    assert "--run_dir" in error(["--push_to_hub", "me/m"])

"""Publishing a pretraining run on the Hugging Face Hub the way the BabyLM evaluation reads it.

The BabyLM pipeline evaluates the intermediate checkpoints of a submission as revisions of one Hub repository:
the final model on ``main``, and every word milestone as a branch named after it (``chck_1M`` ... ``chck_100M``,
``chck_1000M``). ``push_run`` does exactly that with huggingface_hub: ``create_repo``, one ``create_branch``
per milestone directory ``<run>/checkpoints/chck_{N}M/``, and one ``upload_folder`` per revision.

Branches are created from the repository's first commit before anything is uploaded, so each revision holds
only its own model directory. Failures a user can fix (offline, not logged in, no write access, a missing
run directory) become one-line ``UserError``s.
"""

from __future__ import annotations

import re
from pathlib import Path

from ltgbert.checkpointing import CHECKPOINTS_DIR
from ltgbert.errors import UserError

__all__ = ["push_run", "run_revisions"]

_MILESTONE = re.compile(r"^chck_[0-9.]+M$")


def run_revisions(run_dir: str | Path) -> dict[str, Path]:
    """{revision: model directory} of a pretraining output directory: ``main`` -> final/, ``chck_*M`` branches."""
    run_dir = Path(run_dir)
    revisions = {}
    if (run_dir / "final" / "config.json").is_file():
        revisions["main"] = run_dir / "final"
    checkpoints = run_dir / CHECKPOINTS_DIR
    if checkpoints.is_dir():
        for path in sorted(checkpoints.iterdir(), key=lambda p: float(p.name[5:-1]) if _MILESTONE.match(p.name) else 0):
            if _MILESTONE.match(path.name) and (path / "config.json").is_file():
                revisions[path.name] = path
    if not revisions:
        raise UserError(
            f"{run_dir} holds no final/ and no checkpoints/chck_*M/ model directory; pass the "
            "--output_dir of a finished launch/pretrain.py run"
        )
    return revisions


def push_run(
    run_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None, api=None
) -> dict[str, str]:
    """Uploads every revision of ``run_revisions(run_dir)``; returns {revision: commit url}."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    revisions = run_revisions(run_dir)
    api = api if api is not None else HfApi(token=token)
    urls = {}
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        for branch in revisions:
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
        for revision, folder in revisions.items():
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                revision=revision,
                commit_message=f"ltgbert: {folder.name} as {revision}",
            )
            urls[revision] = str(getattr(info, "commit_url", info))
    except OfflineModeIsEnabled:
        raise UserError(
            "cannot push to the Hub while offline (HF_HUB_OFFLINE is set); unset it on a machine with network access"
        ) from None
    except LocalTokenNotFoundError:
        raise UserError("not logged in to the Hugging Face Hub; run `hf auth login` or pass --hub_token") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = "check the token's write access to it" if status in (401, 403) else "check the repository id"
        raise UserError(f"the Hub refused the push to {repo_id} (HTTP {status}); {hint}") from None
    except Exception as e:  # noqa: BLE001  (network errors come from several HTTP libraries)
        raise UserError(
            f"cannot reach the Hugging Face Hub to push {repo_id} ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:120]}); check the network"
        ) from None
    return urls

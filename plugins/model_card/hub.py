"""``--push-to-hub REPO``: upload the model, its card and the report to the Hugging Face Hub.

Design choices
- Checked before training (``check_hub_ready``, from ``sftctl_configure`` on rank 0): offline
  mode (``HF_HUB_OFFLINE``), no token, or a Hub that refuses the token or cannot be reached is a
  ``ConfigError`` naming ``--push-to-hub`` (exit 2), not a surprise after hours of training.
- What is uploaded is decided by one function, ``collect_upload_files(run_dir)``, tested on its
  own: every file of ``model/`` at the repository root (weights, tokenizer, ``README.md``, the
  loss curve, ``sftctl_config.yaml``, ``sftctl_summary.json``), ``adapter/`` (LoRA) as
  ``adapter/``, and the report (``report.json``, ``report.md``, ``report.html``,
  ``report_assets/``) under ``sftctl_report/``. Hidden files (temporaries) are never uploaded.
- One commit through ``HfApi.create_commit``, after ``create_repo(exist_ok=True,
  private=True)``: a new repository starts private, the user makes it public on the Hub. A
  failure is an ``SftctlError`` (exit 1) saying the run is complete on disk and how to retry:
  ``sftctl push-to-hub RUN_DIR REPO`` (``--dry-run`` lists the files).
"""

from __future__ import annotations

from pathlib import Path

from sftctl import ConfigError, SftctlError

REPORT_FILES = ("report.json", "report.md", "report.html")
REPORT_DIR = "sftctl_report"


class HubUploadError(SftctlError):
    exit_code = 1


def check_hub_ready(repo_id: str, *, network: bool = True) -> str:
    """The token to upload with; a ``ConfigError`` naming ``--push-to-hub`` when the upload
    cannot happen (offline mode, no token, the Hub unreachable or refusing the token)."""
    from huggingface_hub import HfApi, constants, get_token

    where = f"train.push_to_hub ({repo_id})"
    if not repo_id or repo_id.count("/") > 1 or repo_id.startswith("/") or \
            repo_id.endswith("/"):
        raise ConfigError(f"{where}: expected a Hub repository id such as user/model-name")
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{where}: the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE=1); "
                          "unset it to upload, or drop --push-to-hub and upload later with "
                          "`sftctl push-to-hub RUN_DIR REPO`")
    token = get_token()
    if not token:
        raise ConfigError(f"{where}: no Hugging Face token: log in with `hf auth login` or set "
                          "HF_TOKEN (a token with write access)")
    if network:
        try:
            HfApi(token=token).whoami()
        except Exception as e:  # no network, DNS, a revoked token: all end the same way
            raise ConfigError(f"{where}: the Hugging Face Hub cannot be reached or refuses the "
                              f"token ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "fix that or drop --push-to-hub (the run would train and then "
                              "fail to upload)") from None
    return token


def collect_upload_files(run_dir: str | Path) -> list[tuple[Path, str]]:
    """(local file, path in the repository) for everything ``--push-to-hub`` uploads."""
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise SftctlError(f"{model_dir}: no complete model to upload (config.json missing)")
    out: list[tuple[Path, str]] = []

    def add_tree(root: Path, prefix: str) -> None:
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root)
            if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                out.append((f, f"{prefix}{rel.as_posix()}"))

    add_tree(model_dir, "")
    if (run_dir / "adapter").is_dir():
        add_tree(run_dir / "adapter", "adapter/")
    for name in REPORT_FILES:
        if (run_dir / name).is_file():
            out.append((run_dir / name, f"{REPORT_DIR}/{name}"))
    if (run_dir / "report_assets").is_dir():
        add_tree(run_dir / "report_assets", f"{REPORT_DIR}/report_assets/")
    return out


def push(run_dir: str | Path, repo_id: str, *, token: str | None = None,
         log=print) -> str:
    """Upload ``collect_upload_files(run_dir)`` to ``repo_id`` in one commit; return its URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    files = collect_upload_files(run_dir)
    token = token or check_hub_ready(repo_id, network=False)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True, private=True)
        info = api.create_commit(
            repo_id, repo_type="model",
            operations=[CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f))
                        for f, p in files],
            commit_message="Upload SFT model, model card and report (sftctl)")
    except Exception as e:
        raise HubUploadError(
            f"--push-to-hub {repo_id}: the upload failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''}); the run is complete in "
            f"{run_dir}: retry with `sftctl push-to-hub {run_dir} {repo_id}`") from e
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    log(f"uploaded {len(files)} files to {url}")
    return url

"""Hugging Face Hub dataset repositories as inputs (`hf` sources).

A source's revision is resolved to a commit once per version of the Dataset: the first slice
pod writes it to a pin file in the work folder, and every slice (and every retry) lists and
downloads the files of that commit, so a branch that moves meanwhile changes nothing. An
input's location names the commit, `hf://datasets/<org>/<name>@<commit>/<path>` (the
address huggingface_hub's HfFileSystem uses), and so do the slices' statistics.

Hub errors (unknown repository or revision, gated, no token) become FileNotFoundError or
OSError with a one-line message: the data engine's failure report.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

from llmops.api.dataset import DataSource, HubDatasetSource

if TYPE_CHECKING:
    from huggingface_hub import HfApi

SCHEME = "hf://datasets/"
TOKEN_HINT = "a token may be needed: set hf.credentialsSecret to a Secret with HF_TOKEN"
# File names that are not data unless an include pattern selects them (dot files neither).
NOT_DATA = ("*.md", "LICENSE*", "*.py")


def endpoint(hub: HubDatasetSource) -> str | None:
    """The source's mirror, else the pod's HF_ENDPOINT, else (None) the Hugging Face Hub."""
    return hub.endpoint or os.environ.get("HF_ENDPOINT") or None


def _api(hub: HubDatasetSource) -> HfApi:
    from huggingface_hub import HfApi
    from huggingface_hub.utils.tqdm import disable_progress_bars

    disable_progress_bars()  # a pod log is not a terminal
    return HfApi(endpoint=endpoint(hub), token=os.environ.get("HF_TOKEN") or None)


def commit(source: DataSource, pin_dir: Path | None) -> str:
    """The commit `revision` names. With `pin_dir` (the work folder the slices share), the
    first slice's answer is kept there, and later slices and retries take it."""
    assert source.hf is not None
    hub = source.hf
    key = json.dumps([hub.repo, hub.revision, endpoint(hub)])
    pin = pin_dir / f"hub-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json" if pin_dir else None
    if pin is None or not pin.is_file():
        with _errors(source):
            sha = _api(hub).dataset_info(hub.repo, revision=hub.revision).sha
        if not sha:
            raise OSError(f"source {source.name}: {_where(hub)} named no commit for the revision")
        if pin is None:
            return sha
        pin.parent.mkdir(parents=True, exist_ok=True)
        draft = pin.with_name(f".{pin.name}.{uuid.uuid4().hex}")
        draft.write_text(json.dumps({"repo": hub.repo, "revision": hub.revision, "commit": sha}))
        try:
            os.link(draft, pin)  # atomic, and never replaces another slice's pin
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    pinned: str = json.loads(pin.read_text())["commit"]
    return pinned


def files(source: DataSource, sha: str) -> list[str]:
    """Every file of the repository at `sha`, by its path in the repository."""
    assert source.hf is not None
    with _errors(source):
        return _api(source.hf).list_repo_files(source.hf.repo, repo_type="dataset", revision=sha)


def not_data(name: str) -> bool:
    """Dot files and folders, the dataset card, licences and loading scripts."""
    parts = name.split("/")
    return any(p.startswith(".") for p in parts) or any(
        fnmatch.fnmatchcase(parts[-1], pattern) for pattern in NOT_DATA
    )


def location(hub: HubDatasetSource, sha: str, name: str) -> str:
    return f"{SCHEME}{hub.repo}@{sha}/{name}"


def open_file(source: DataSource, location: str) -> IO[bytes]:
    """One file of the repository, downloaded to scratch space; the open file outlives its
    folder (removed at once), so the space is freed when the caller closes it."""
    from huggingface_hub import hf_hub_download

    assert source.hf is not None and location.startswith(SCHEME)
    hub = source.hf
    sha, _, name = location[len(SCHEME) + len(hub.repo) + 1 :].partition("/")
    with tempfile.TemporaryDirectory(prefix="llmops-hub-") as scratch, _errors(source):
        path = hf_hub_download(
            hub.repo,
            name,
            repo_type="dataset",
            revision=sha,
            local_dir=scratch,
            endpoint=endpoint(hub),
            token=os.environ.get("HF_TOKEN") or None,
        )
        return open(path, "rb")  # the caller closes it


def _where(hub: HubDatasetSource) -> str:
    return f"dataset repository {hub.repo} at {endpoint(hub) or 'the Hugging Face Hub'}"


@contextmanager
def _errors(source: DataSource) -> Iterator[None]:
    """The Hub's errors as one-line messages that name the source and what to fix."""
    import httpx
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    assert source.hf is not None
    where = f"source {source.name}: {_where(source.hf)}"
    token = bool(os.environ.get("HF_TOKEN"))
    try:
        yield
    except GatedRepoError as error:
        raise OSError(f"{where} is gated: {TOKEN_HINT}") from error
    except RevisionNotFoundError as error:
        revision = source.hf.revision or "main"
        raise FileNotFoundError(f"{where} has no revision {revision!r}") from error
    except RepositoryNotFoundError as error:
        # The Hub answers the same for a private repository without a valid token.
        hint = "" if token else f" (if it is private, {TOKEN_HINT})"
        raise FileNotFoundError(f"{where} does not exist{hint}") from error
    except EntryNotFoundError as error:
        raise FileNotFoundError(f"{where}: {_first_line(error)}") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        hint = f": {TOKEN_HINT}" if status in (401, 403) else ""
        raise OSError(f"{where}: {_first_line(error)}{hint}") from error
    except httpx.HTTPError as error:  # unreachable, timed out
        raise OSError(f"{where}: {_first_line(error)}") from error


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

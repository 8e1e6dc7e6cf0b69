"""`qrec rollback`: serve an earlier model version again and make the learner resume from it.

The learner keeps its last few published versions beside its checkpoint (``CHECKPOINT_DIR.history``,
``--keep-models``). A rollback republishes one of them under a new, higher version number (actors
only ever move forward, so they swap to it like to any new model) and replaces the learner's
checkpoint with that version's, so the learner restarted afterwards trains on from the old
parameters instead of publishing the bad ones again. Stop the learner before rolling back: a running
learner would overwrite the checkpoint at its next publish.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.bus.base import Bus
from services.config import BusConfig, ConfigError, register, setting
from services.learner.service import history_dir, replace_folder
from services.model_topic import publish_model
from services.topics import MODEL


@register("rollback")
@dataclass(frozen=True, kw_only=True)
class RollbackConfig(BusConfig):
    """Serves an earlier model version again and makes the learner resume from it."""

    to_version: int = setting(0, help="the published version to serve again; 0 lists the versions kept")
    checkpoint_dir: str = setting(
        ".qrec/learner", help="the learner's checkpoint folder (stop the learner before rolling back)"
    )
    model_topic: str = setting(MODEL, help="topic models are published to")
    relearn: bool = setting(
        False,
        help="also rewind the learner's reading of the transitions topic to where that version was, "
        "so it learns the later transitions again; by default it carries on from where it stopped",
    )


def kept_versions(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """The versions kept for rollback, oldest first: version, step, transitions learned, time."""
    history = history_dir(checkpoint_dir)
    if not history.is_dir():
        return []
    kept = []
    for folder in sorted(history.glob("v*")):
        meta_path = folder / "checkpoint" / "meta.json"
        if not (folder / "model.bin").is_file() or not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        kept.append(
            {
                "version": meta["version"],
                "step": meta["step"],
                "learned": meta["learned"],
                "created_at": meta.get("created_at"),
            }
        )
    return kept


def rollback(config: RollbackConfig, bus: Bus) -> dict[str, Any]:
    """Republish version ``config.to_version`` as the next version and point the checkpoint at it."""
    checkpoint_dir = Path(config.checkpoint_dir)
    meta_path = checkpoint_dir / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"no learner checkpoint in {checkpoint_dir}: pass the learner's --checkpoint-dir")
    current = json.loads(meta_path.read_text())
    archive = history_dir(checkpoint_dir) / f"v{config.to_version:08d}"
    if not (archive / "model.bin").is_file():
        kept = ", ".join(str(v["version"]) for v in kept_versions(checkpoint_dir)) or "none"
        raise ConfigError(
            f"version {config.to_version} is not kept in {history_dir(checkpoint_dir)} (kept: {kept}); "
            "the learner keeps its last --keep-models versions"
        )
    new_version = int(current["version"]) + 1
    old_meta = json.loads((archive / "checkpoint" / "meta.json").read_text())

    # The checkpoint first: should publishing fail, the restarted learner still resumes from the old
    # parameters and publishes them (plus its next updates) as the following version.
    staging = Path(tempfile.mkdtemp(prefix=".rollback-", dir=checkpoint_dir.parent))
    shutil.copytree(archive / "checkpoint", staging, dirs_exist_ok=True)
    meta = {**old_meta, "version": new_version, "rolled_back_from": current["version"]}
    if not config.relearn:
        # Carry on reading where the learner stopped; what it saw since stays seen (not learned again).
        meta["offsets"] = current["offsets"]
        meta["learned"] = current["learned"]
        shutil.copyfile(checkpoint_dir / "seen_ids.json", staging / "seen_ids.json")
    (staging / "meta.json").write_text(json.dumps(meta, indent=2))
    replace_folder(staging, checkpoint_dir)

    header = json.loads((archive / "header.json").read_text())
    producer = bus.producer()
    try:
        sent = publish_model(
            producer,
            config.model_topic,
            version=new_version,
            step=header["step"],
            data=(archive / "model.bin").read_bytes(),
            encoding=header["encoding"],
            vocabulary_size=header["vocabulary_size"],
            config=header["config"],
        )
    finally:
        producer.close()
    return {
        "rolled_back_to": config.to_version,
        "published_as": new_version,
        "replaced": current["version"],
        "bytes": sent,
        "relearn": config.relearn,
    }

"""What a run shows and keeps besides weights: dvclive curves (replayed on resume) and the metrics file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dvclive import Live
from scmrepo.exceptions import SCMError as GitSCMError

from pipeline.atomic import write_json
from pipeline.models.checkpoints import load_checkpoint


def open_live(live_dir: Path, fold: int, elastic_by_class: dict[str, float], history: list[dict]) -> Live:
    """A fresh dvclive logger holding the curves of the epochs already done (a resumed run replays them).

    DVC deletes a stage's plot outputs before it re-runs it, so replaying, rather than appending to
    what is on disk, is what makes a resumed run's curves whole.
    """
    try:
        live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    except GitSCMError:
        live = _FilesOnlyLive(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    # How much more often rare classes get elastic deformation: logged once per fold.
    print(
        f"fold {fold} mean elastic probability by class: "
        + ", ".join(f"{name} {p:.2f}" for name, p in elastic_by_class.items())
    )
    live.log_params({"fold": fold, "elastic_p_by_class": elastic_by_class})
    for record in history:
        log_epoch(live, record)
    return live


class _FilesOnlyLive(Live):
    """dvclive without its repository lookups: it only writes the metric files dvc.yaml declares.

    dvclive 3.49 reads the git HEAD even when it saves no experiment, and raises in a git repository
    with no commit yet (treeverse/dvclive#522). Skipping the lookup leaves the state dvclive itself
    falls back to when that lookup fails with a DVC error: no experiment, no Studio updates.
    """

    def _init_dvc(self) -> None:
        return None


def log_epoch(live: Live, record: dict[str, float]) -> None:
    """One point of each per-epoch curve (x = epoch, dvclive's step)."""
    for name, value in record.items():
        live.log_metric(name, value)
    live.next_step()


def write_metrics(model_dir: Path, metrics: Path) -> dict[str, Any]:
    """The headline metric of best.pt, its validation mIoU, to `metrics`; returns it with the epoch.

    Per-class IoUs and the epoch stay in best.pt ("iou", "epoch") and in the ensemble report: a metrics
    file with more columns makes `dvc metrics show`, one table for every file, unreadable.
    """
    best = load_checkpoint(model_dir / "best.pt")
    write_json(metrics, {"miou": best["score"]})
    return {"miou": best["score"], "epoch": best["epoch"]}

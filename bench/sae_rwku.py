"""What the SAE benches share: the 10 RWKU targets registered as `lethe eval` registers them (name,
intro, passages) in a scratch store, their features chosen as the gateway chooses them, and the
command-line flags that say where the SAE, the data and the embedded model are."""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lethe.evaluation import datasets
from lethe.gateway.runtime.sae_service import SAEService
from lethe.gateway.store import SQLiteStore
from lethe.guards.features import SelectionConfig, TargetFeatures
from lethe.guards.targets import Target, TargetSpec
from lethe.models.embedded import embedded_checkpoint


@dataclass
class RwkuSetup:
    data_dir: Path
    model: Path
    rwku: list[datasets.RwkuTarget]
    service: SAEService
    targets: tuple[Target, ...]
    features: dict[str, TargetFeatures]
    by_folder: dict[str, str]
    """RWKU folder -> registered target id."""
    choose_seconds: float


def add_flags(parser: argparse.ArgumentParser, sample: int | None) -> None:
    parser.add_argument("--sae", required=True, help="the SAE folder (trained on the embedded model)")
    parser.add_argument(
        "--eval-data", default=None, help="evaluation data (default: $LETHE_EVAL_DATA or ../shared/eval)"
    )
    parser.add_argument("--home", default="~/.lethe", help="LETHE_HOME holding the converted embedded model")
    parser.add_argument("--sample", type=int, default=sample, help="only the first N probes of each set")


def rwku_setup(args: argparse.Namespace) -> RwkuSetup:
    data_dir = datasets.resolve_data_dir(args.eval_data)
    model = embedded_checkpoint(Path(args.home).expanduser())
    rwku = datasets.rwku_targets(data_dir)
    with tempfile.TemporaryDirectory() as scratch:
        store = SQLiteStore(Path(scratch) / "lethe.db")
        service = SAEService(Path(args.sae), store, model, SelectionConfig())
        by_folder = {
            target.folder: store.create_target(
                TargetSpec(name=target.name, description=target.intro, documents=target.passages)
            ).id
            for target in rwku
        }
        started = time.perf_counter()
        service.choose_missing()
        choose_seconds = time.perf_counter() - started
        features = service.features()
        targets = store.snapshot().targets
    return RwkuSetup(data_dir, model, rwku, service, targets, features, by_folder, choose_seconds)

"""The SAE a gateway serves (`LETHE_SAE`): its clamp on every engine the gateway starts, and the
features of every target that asks for the clamp, chosen in the background and kept in the store.

Choosing features runs the served checkpoint's first layers on the target's text, which takes a
moment on a CPU; it never holds up a registration. Until a target's features are stored, a fired
request gets its decoding restrictions only (`GET /admin/targets/{id}` shows whether features are
there). Every replica reads the same stored features; two replicas choosing the same target's at
once write identical rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lethe.gateway.store import Store
from lethe.guards.features import SelectionConfig, TargetFeatures
from lethe.guards.index import Detector, Fired
from lethe.guards.targets import Target
from lethe.models.engine import Engine, HookHandle
from lethe.models.sae.clamp import FeatureClamp
from lethe.models.sae.features import ResidualReader, firing_shares, forget_texts, select_features
from lethe.models.sae.retain_text import CHAT_REQUESTS, PROSE
from lethe.models.sae.sparse_autoencoder import SparseAutoencoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SAECard:
    """What `/v1/models` and `/metrics` say about the served SAE."""

    name: str
    fingerprint: str
    layer: int
    features: int
    architecture: str


class SAEService:
    def __init__(
        self,
        folder: Path,
        store: Store,
        model_path: Path,
        selection: SelectionConfig,
        retain_text: Path | None = None,
    ) -> None:
        self.sae = SparseAutoencoder.load(folder)
        self.card = SAECard(
            name=folder.name,
            fingerprint=self.sae.fingerprint,
            layer=self.sae.layer,
            features=self.sae.config.d_sae,
            architecture=self.sae.config.architecture,
        )
        self._store = store
        self._model_path = model_path
        self._selection = selection
        self._retain_text = retain_text
        self._reader: ResidualReader | None = None
        self._retain: list[torch.Tensor] | None = None
        self._reader_lock = threading.Lock()
        self._pending = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ serving
    async def install(self, engine: Engine) -> HookHandle:
        """The clamp on `engine`'s layer; it acts on rows whose plan names features, nothing else."""
        return await engine.add_layer_hook(self.sae.layer, FeatureClamp(self.sae))

    def features(self) -> dict[str, TargetFeatures]:
        """The current features of every target under this SAE (blocking: call off the loop)."""
        return {f.target_id: f for f in self._store.target_features(sae=self.card.fingerprint)}

    # ------------------------------------------------------------------ choosing features
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lethe-sae-features")
        self._pending.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self, revision: int) -> None:
        """A store-watcher listener: look for targets without current features."""
        self._pending.set()

    async def _run(self) -> None:
        try:  # the model's first layers and the general text, before a registration or a prompt waits
            await asyncio.to_thread(self.prepared)
        except Exception:
            logger.exception("preparing the SAE's reader failed; the next feature choice tries again")
        while True:
            await self._pending.wait()
            self._pending.clear()
            try:
                await asyncio.to_thread(self.choose_missing)
            except Exception:  # the next change tries again; the guard still restricts decoding
                logger.exception("choosing SAE features failed")

    def choose_missing(self) -> int:
        """Choose and store the features of every enabled target that asks for the clamp and has
        none for its present version; returns how many were stored."""
        current = {
            f.target_id: f.target_version for f in self._store.target_features(sae=self.card.fingerprint)
        }
        missing = [
            t
            for t in self._store.snapshot().targets
            if t.enabled and t.suppression != "decoding" and current.get(t.id) != t.version
        ]
        stored = 0
        for target in missing:
            features = self.choose(target)
            if self._store.put_target_features(target.id, features):
                stored += 1
                logger.info(
                    "target %s (version %d): %d SAE features chosen from %d tokens",
                    target.id,
                    target.version,
                    len(features.features),
                    features.forget_tokens,
                )
        return stored

    def choose(self, target: Target) -> TargetFeatures:
        reader, retain = self.prepared()
        plain, chat = forget_texts(target)
        forget = reader.read(plain, chat, budget=self._selection.max_forget_tokens)
        return select_features(self.sae, forget, retain, target.id, target.version, self._selection)

    def prepared(self) -> tuple[ResidualReader, list[torch.Tensor]]:
        """The reader and the retain texts' residual streams, made on first use (a model load)."""
        with self._reader_lock:
            if self._reader is None or self._retain is None:
                self._reader = ResidualReader(self._model_path, self.sae.layer)
                prose = list(PROSE)
                if self._retain_text is not None:
                    prose += [p for p in self._retain_text.read_text().split("\n\n") if p.strip()]
                self._retain = self._reader.read_each(self._reader.encode(prose, CHAT_REQUESTS))
            return self._reader, self._retain

    # ------------------------------------------------------------------ detection
    def detector_factory(
        self, primary: Callable[[Sequence[Target]], Detector]
    ) -> Callable[[Sequence[Target]], Detector]:
        """Wraps the guard's detector factory: a target fires when the primary detector finds it or
        when its features fire on enough of the text (LETHE_SAE_DETECTION)."""

        def build(targets: Sequence[Target]) -> Detector:
            features = self.features()
            chosen = {t.id: features[t.id] for t in targets if t.id in features and features[t.id].features}
            return EitherDetector(primary(targets), SAEDetector(self, chosen))

        return build

    def shares(self, ids: list[int], features: dict[str, TargetFeatures]) -> dict[str, float]:
        """Per target, the share of the text's tokens on which one of its features fires."""
        reader, _ = self.prepared()
        [residual] = reader.read_each([ids]) or [torch.zeros(0, self.sae.config.d_in)]
        sets = {target_id: [f.index for f in chosen.features] for target_id, chosen in features.items()}
        return firing_shares(self.sae, residual, sets)


@dataclass(frozen=True)
class SAEFired:
    target_id: str
    share: float


class SAEDetector:
    """Fires a target when its SAE features fire on at least its calibrated share of the tokens of
    the conversation (in the chat template) or of the answer so far."""

    def __init__(self, service: SAEService, features: dict[str, TargetFeatures]) -> None:
        self._service = service
        self._features = features

    def detect_conversation(self, messages: Sequence[str]) -> list[SAEFired]:
        if not self._features:
            return []
        reader, _ = self._service.prepared()
        return self._fired(reader.encode_chat([("user", m) for m in messages]))

    def detect_generated(self, text: str) -> list[SAEFired]:
        if not self._features:
            return []
        reader, _ = self._service.prepared()
        return self._fired(reader.encode_text(text))

    def _fired(self, ids: list[int]) -> list[SAEFired]:
        shares = self._service.shares(ids, self._features)
        return [
            SAEFired(target_id, share)
            for target_id, share in shares.items()
            if share >= self._features[target_id].detect_share
        ]


class EitherDetector:
    """A target fires when either detector finds it."""

    def __init__(self, primary: Detector, secondary: Detector) -> None:
        self._detectors = (primary, secondary)

    def detect_conversation(self, messages: Sequence[str]) -> list[Fired]:
        return _union(d.detect_conversation(messages) for d in self._detectors)

    def detect_generated(self, text: str) -> list[Fired]:
        return _union(d.detect_generated(text) for d in self._detectors)


def _union(results: Iterable[Sequence[Fired]]) -> list[Fired]:
    seen: dict[str, Fired] = {}
    for fired in results:
        for hit in fired:
            seen.setdefault(hit.target_id, hit)
    return list(seen.values())

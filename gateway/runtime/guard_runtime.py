"""Keeps the serving guard index in step with the store and answers "what must this request obey"."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from lethe.gateway.store import Store
from lethe.guards.compiler import Vocabulary
from lethe.guards.config import DetectionConfig, GuardConfig
from lethe.guards.detection import TargetDetector
from lethe.guards.embedding import default_embedder
from lethe.guards.index import Decision, Detector, GuardIndex
from lethe.guards.targets import Target
from lethe.models.engine import Engine, HookHandle

if TYPE_CHECKING:
    from lethe.gateway.runtime.sae_service import SAEService

logger = logging.getLogger(__name__)
T = TypeVar("T")


class GuardFailure(RuntimeError):
    """Detection failed: the request fails closed rather than being answered unguarded (the API
    answers 503 `guard_unavailable`)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"The request could not be checked ({type(error).__name__}); try again.")


class DetectorFactory:
    """Builds each new detector from the previous one, so an edit re-embeds only what changed."""

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self._config = config or DetectionConfig()
        self._previous: TargetDetector | None = None

    def __call__(self, targets: Sequence[Target]) -> TargetDetector:
        detector = TargetDetector.build(targets, default_embedder(), self._config, previous=self._previous)
        self._previous = detector
        return detector


class GuardRuntime:
    def __init__(
        self,
        store: Store,
        engine: Engine,
        build_detector: Callable[[Sequence[Target]], Detector],
        config: GuardConfig,
        sae: SAEService | None = None,
    ) -> None:
        self._store = store
        self._engine = engine
        self.sae = sae
        self._clamp: HookHandle | None = None
        self._encode = engine.encode_text
        self._decode_token = engine.decode_token
        self._vocab_size = engine.vocab_size
        self._model_path = engine.model_path
        self._build_detector = build_detector
        self._config = config
        self._vocabulary: Vocabulary | None = None
        self._index = GuardIndex(revision=-1, detector=None, config=config)
        self._lock = asyncio.Lock()

    @property
    def index(self) -> GuardIndex:
        return self._index

    async def start(self) -> None:
        """Install the SAE clamp on the engine (when an SAE is served), then build the index."""
        if self.sae is not None and self._clamp is None:
            self._clamp = await self.sae.install(self._engine)
        await self.reload()

    async def refresh(self, revision: int) -> None:
        """Follow the store (gateway/runtime/store_watcher.py) when its targets moved on."""
        if revision != self._index.revision:
            await self.reload()

    async def reload(self) -> None:
        """Rebuild the index if the store moved on; requests keep using the old one meanwhile."""
        async with self._lock:
            snapshot = await asyncio.to_thread(self._store.snapshot)
            if snapshot.revision == self._index.revision:
                return
            index = await asyncio.to_thread(self._build, snapshot.revision, snapshot.targets)
            self._index = index
            logger.info("guard index at revision %d: %d active targets", index.revision, len(index.compiled))

    def _build(self, revision: int, targets: Sequence[Target]) -> GuardIndex:
        if self._vocabulary is None and any(t.enabled for t in targets):
            from lethe.models.vocab import input_embeddings

            texts = [self._decode_token(i) for i in range(self._vocab_size)]
            self._vocabulary = Vocabulary.build(input_embeddings(self._model_path), texts)
        features = self.sae.features() if self.sae is not None else None
        return GuardIndex.build(
            revision, targets, self._build_detector, self._encode, self._vocabulary, self._config, features
        )

    @staticmethod
    async def check_conversation(index: GuardIndex, messages: Sequence[str]) -> Decision:
        if index.detector is None:
            return index.decide(())
        return await _fail_closed(index.check_conversation, messages)

    @staticmethod
    async def check_generated(index: GuardIndex, text: str) -> Decision:
        return await _fail_closed(index.check_generated, text)


async def _fail_closed(check: Callable[[T], Decision], subject: T) -> Decision:
    """Run a detection off the event loop; any failure becomes a GuardFailure (no unguarded answer)."""
    try:
        return await asyncio.to_thread(check, subject)
    except Exception as error:
        logger.exception("detection failed")
        raise GuardFailure(error) from error

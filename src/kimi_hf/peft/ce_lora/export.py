"""Export a CE-LoRA adapter as a plain LoRA adapter that stock PEFT loads without kimi_hf.

CE-LoRA trains exactly LoRA's parameters under LoRA's key names; only the backward differs. The export
therefore keeps the weights and rewrites the config as a ``LoraConfig`` (the ``ce_*`` options dropped).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from peft import LoraConfig, PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import save_file

from .config import CELoraConfig

_CONFIG_NAME = "adapter_config.json"


def _lora_config_from(options: dict) -> LoraConfig:
    """A ``LoraConfig`` with every LoRA option of a CE-LoRA config dict (``ce_*`` and ``peft_type`` dropped)."""
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init} - {"peft_type"}
    return LoraConfig(**{k: v for k, v in options.items() if k in lora_fields})


def export_as_lora(source: PeftModel | str | Path, save_directory: str | Path, adapter_name: str = "default") -> Path:
    """Write ``source``'s CE-LoRA adapter to ``save_directory`` as a plain LoRA adapter.

    Args:
        source: a ``PeftModel`` holding a CE-LoRA adapter, or the directory a CE-LoRA adapter was saved to
            with ``save_pretrained`` (``adapter_config.json`` + weights).
        save_directory: where ``adapter_config.json`` (``peft_type: "LORA"``) and the weights go.
        adapter_name: which adapter of a ``PeftModel`` to export. A directory holds one adapter: pass that adapter's
            own folder (``save_pretrained`` writes an adapter other than ``"default"`` to ``<dir>/<name>``); another
            name than ``"default"`` with a directory is refused rather than ignored.

    Returns:
        ``save_directory`` as a ``Path``. The weights are read and written as ``adapter_model.safetensors`` only
        (a folder saved with ``safe_serialization=False`` is refused), which PEFT reads before any other file.
    """
    out = Path(save_directory)
    if isinstance(source, PeftModel):
        if adapter_name not in source.peft_config:
            raise ValueError(f"no adapter {adapter_name!r} in this model (its adapters: {sorted(source.peft_config)})")
        config = source.peft_config[adapter_name]
        if not isinstance(config, CELoraConfig):
            raise ValueError(f"adapter {adapter_name!r} is not a CE-LoRA adapter (config {type(config).__name__})")
        lora_config = _lora_config_from(config.to_dict())
        state = get_peft_model_state_dict(source, adapter_name=adapter_name)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        # the metadata PEFT's own save_pretrained writes (accelerate's loader warns without it)
        save_file(tensors, str(out / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    elif isinstance(source, (str, Path)):
        src = Path(source)
        if adapter_name != "default":  # a folder holds one adapter: ignoring the name would export another one
            raise ValueError(f"adapter_name={adapter_name!r} selects an adapter of a PeftModel; for a directory pass "
                             f"that adapter's folder (save_pretrained writes it to {src / adapter_name})")  # fmt: skip
        options = json.loads((src / _CONFIG_NAME).read_text())
        if options.get("peft_type") != "CE_LORA":
            raise ValueError(f"{src / _CONFIG_NAME} is not a CE-LoRA adapter (peft_type {options.get('peft_type')!r})")
        lora_config = _lora_config_from(options)
        if not (src / SAFETENSORS_WEIGHTS_NAME).exists():
            legacy = " (only a pickled adapter_model.bin: save it with safe_serialization=True, PEFT's default)"
            raise ValueError(
                f"no {SAFETENSORS_WEIGHTS_NAME} in {src}{legacy if (src / WEIGHTS_NAME).exists() else ''}"
            )
        out.mkdir(parents=True, exist_ok=True)
        if src.resolve() != out.resolve():
            shutil.copyfile(src / SAFETENSORS_WEIGHTS_NAME, out / SAFETENSORS_WEIGHTS_NAME)
    else:
        raise TypeError(f"source must be a PeftModel or an adapter directory, got {type(source).__name__}")
    lora_config.save_pretrained(str(out))
    return out

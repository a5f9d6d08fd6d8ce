"""Settings that make a whole round run in a minute or two on 2 CPU cores (tests only)."""


def tiny_settings(store_root: str, builtin_cache: str, grpc_port: int = 9000, http_port: int = 8000) -> dict:
    return {
        "model": {"base": "builtin:tiny-llama", "builtin_cache_dir": builtin_cache},
        "store": {"root": store_root},
        "serve": {"grpc_port": grpc_port, "http_port": http_port, "request_timeout_s": 300},
        "generation": {"num_prompts": 4, "max_new_tokens": 48, "instance_max_new_tokens": 48, "batch_size": 8},
        "training": {"epochs": 1, "bootstrap_epochs": 2, "bootstrap_examples_per_task": 1, "max_seq_len": 256,
                     "batch_size": 16, "poll_interval_s": 0.5},
        "evaluation": {"max_instances_per_task": 1, "max_new_tokens": 16},
        "loop": {"rounds": 1},
    }

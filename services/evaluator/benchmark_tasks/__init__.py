"""lm-evaluation-harness tasks that ship with reinstruct (task YAML, local data, checking code): each
runs offline. services/evaluator/standard_benchmarks.py adds this directory to lm-eval's task index."""

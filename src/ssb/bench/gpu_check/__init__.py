"""The parts of the GPU check, `benchmarks/gpu_check.py` (which runs them in order and says what
each checks): `steps` (running and recording steps, the CLI, the summary table), `setup` (steps
1-2: environment, model), `stages` (3-7 and 9: the stages through the CLI, FSDP2), `lora` (8: the
LoRA token comparison), `bench` (10: the bench's GPU section)."""

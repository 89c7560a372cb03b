"""`re2tal plan`: the per-worker peak memory of a training step, predicted on the meta device
(`plan`), the live-tensor and saved-tensor counters it runs under (`memory`), and DeepSpeed's ZeRO
layout of parameters, gradients and optimizer states (`zero_layout`)."""

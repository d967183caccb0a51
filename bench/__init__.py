"""The razorpass benchmark harness: fine-tune real pre-trained models on real data with
each memory-saving method and measure accuracy, saved-for-backward bytes, step peak
memory, step time and FLOPs side by side. Run ``razorpass-bench --help`` or
``python -m razorpass.bench``; see bench/README.md."""

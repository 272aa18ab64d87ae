"""A stand-in (installed as `torchvision` in sys.modules by run_official.py, after the libraries have checked for the real one) for the few torchvision.transforms the research scripts use (Resize, crops, flip,
ToTensor, Normalize), so benchmarks/bench_official.py can run them without a multi-GB torchvision
install. Only put on PYTHONPATH for those child processes."""

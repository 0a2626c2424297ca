"""utils/dgs: the method; utils/training: the training program; the modules here are ground
helpers (errors, files, cuda_capture, cpu_memory, signals) that import nothing else of the project."""

"""The training program around the DGS step: flags (config.py), set-up and entry point (main.py),
the epoch loop (trainer.py), losses, metrics and the run's outputs (runlog.py); after training,
reports (report.py, probes.py) and sweeps of methods × seeds (sweep.py, workers.py, aggregate.py)."""

"""After training: reports of a run's folder (plots, tables) and linear probes of its encoders."""

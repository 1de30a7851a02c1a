"""wwcli: heavy-tailed spectral diagnostics for saved neural-network checkpoints."""

__version__ = "0.1.0"

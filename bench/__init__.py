"""kvrouter benchmarks: `python -m bench.<name> --quick --json PATH`."""

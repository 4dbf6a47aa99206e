"""Engine adapters and the simulated engine (one subpackage per engine)."""

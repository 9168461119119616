"""mlgen bench: this machine's images/s, steps/s and memory for named models or random-weight architectures."""

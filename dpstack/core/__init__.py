"""The shared vocabulary every package may import: robot and action specs,
normalisation, noise schedules, the streaming ladder and summary statistics.
Plain numpy; nothing here imports another dpstack package."""

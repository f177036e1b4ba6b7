"""What a run reports, in one place: its run directory (open_run_dir, the shared-directory check, the per-rank
sample log), the writers (metrics.jsonl, events.jsonl, TensorBoard, the console on rank 0), what one log line
sums up (interval.py), the start-up table, and the one table printer everything prints with."""
